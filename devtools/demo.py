"""Demo data for ``make run``: a few municipalities in different prefectures, residents and doses.

Seeded through the public API with fixed ids and idempotency keys, so running it again changes nothing.
"""

from __future__ import annotations

import random
from datetime import date, timedelta

import httpx

from devtools.tokens import bearer_headers
from shared.auth import Role

# 札幌市, 千代田区, 大阪市, 福岡市, 那覇市
MUNICIPALITIES = ("011002", "131016", "271004", "401307", "472018")
INSTITUTION = "1312345678"
RESIDENTS_PER_MUNICIPALITY = 24
FAMILY = ("佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "山本", "中村")
FAMILY_KANA = ("サトウ", "スズキ", "タカハシ", "タナカ", "イトウ", "ワタナベ", "ヤマモト", "ナカムラ")
GIVEN = ("花子", "太郎", "陽子", "健一", "美咲", "大輔")
GIVEN_KANA = ("ハナコ", "タロウ", "ヨウコ", "ケンイチ", "ミサキ", "ダイスケ")


def seed_demo(gateway: str) -> None:
    rng = random.Random(2021)  # fixed: the same demo every time
    institution = bearer_headers(Role.INSTITUTION, institution=INSTITUTION)
    with httpx.Client(base_url=gateway, timeout=30) as http:
        doses = []
        for code in MUNICIPALITIES:
            headers = bearer_headers(Role.MUNICIPALITY, municipality=code)
            for n in range(RESIDENTS_PER_MUNICIPALITY):
                coupon_number = f"{int(code[:5]) % 1000:03d}{n:07d}"
                f, g = rng.randrange(len(FAMILY)), rng.randrange(len(GIVEN))
                sex = "F" if g % 2 == 0 else "M"
                birth = date(1935, 1, 1) + timedelta(days=rng.randrange(365 * 70))
                # The last two people are not registered yet: their doses arrive 'unmatched' (U/UNK).
                if n < RESIDENTS_PER_MUNICIPALITY - 2:
                    resident = {
                        "name": f"{FAMILY[f]} {GIVEN[g]}",
                        "name_kana": f"{FAMILY_KANA[f]} {GIVEN_KANA[g]}",
                        "birth_date": None if n == 0 else birth.isoformat(),
                        "sex": "U" if n == 1 else sex,
                        "coupon_number": coupon_number,
                    }
                    path = f"/api/v1/municipalities/{code}/residents/demo-{n:04d}"
                    http.put(path, json=resident, headers=headers).raise_for_status()
                first = date(2021, 5, 10) + timedelta(days=rng.randrange(40))
                for dose_number, day in ((1, first), (2, first + timedelta(days=21))):
                    if dose_number == 2 and n % 3 == 0:
                        continue  # not everyone has had the second dose yet
                    doses.append(
                        {
                            "client_id": f"demo-{code}-{n:04d}-{dose_number}",
                            "coupon": f"1{dose_number}{code}{coupon_number}",
                            "dose_number": dose_number,
                            "vaccinated_on": day.isoformat(),
                            "vaccine": "moderna" if n % 5 == 0 else "pfizer",
                            # Each product's own lot format (vaccine_rules.toml): Spikevax 7 digits.
                            "lot_number": f"300{rng.randrange(1000, 9999)}"
                            if n % 5 == 0
                            else f"EY{rng.randrange(1000, 9999)}",
                            "venue": "集団接種会場",
                            "medical_worker": n % 7 == 0,
                        }
                    )
        r = http.post("/api/v1/doses/batch", json={"doses": doses}, headers=institution)
        r.raise_for_status()
