"""性別 as VRS and the open data record it (M, F, U), and the codes of 住民基本台帳 exports."""

from __future__ import annotations

import unicodedata
from enum import StrEnum


class Sex(StrEnum):
    MALE = "M"
    FEMALE = "F"
    UNKNOWN = "U"  # not recorded: the open data has doses of such people

    @property
    def juki_code(self) -> str:
        """The 住基 code: 1 male, 2 female, 9 unknown."""
        return _JUKI_OF[self]


_JUKI_OF = {Sex.MALE: "1", Sex.FEMALE: "2", Sex.UNKNOWN: "9"}

# Every spelling a resident file may carry, after NFKC and upper-casing (full-width Ｍ, １ included).
_SPELLINGS: dict[str, Sex] = {
    "M": Sex.MALE,
    "F": Sex.FEMALE,
    "U": Sex.UNKNOWN,
    "1": Sex.MALE,
    "2": Sex.FEMALE,
    "9": Sex.UNKNOWN,
    "": Sex.UNKNOWN,
    "男": Sex.MALE,
    "女": Sex.FEMALE,
    "男性": Sex.MALE,
    "女性": Sex.FEMALE,
    "不明": Sex.UNKNOWN,
}

SEX_SPELLINGS = "M, F, U, 1 (male), 2 (female), 9 or empty (unknown), 男, 女"


def parse_sex(value: str) -> Sex:
    """The sex a file means by ``value``; ``ValueError`` naming the accepted spellings otherwise."""
    sex = _SPELLINGS.get(unicodedata.normalize("NFKC", value).strip().upper())
    if sex is None:
        raise ValueError(f"must be one of {SEX_SPELLINGS}")
    return sex
