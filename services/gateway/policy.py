"""The gateway's one policy table: where each external path goes, who may call it, and what gets audited.

Every request is matched against :data:`POLICY` before anything else. A path (or method) that is not in
the table — every ``/internal/...`` path included — is answered ``404 no such endpoint`` and never
forwarded. The services re-check roles and scope themselves; the table is the first line, not the only one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from shared.auth import Principal, Role
from shared.errors import Forbidden, NotFound, Unauthorized, resident_not_found


def no_such_endpoint() -> NotFound:
    return NotFound("no such endpoint")


class Upstream(StrEnum):
    REGISTRY = "registry"
    RECORDS = "records"
    STATS = "stats"
    GATEWAY = "gateway"  # answered by the gateway itself (the audit trail)


class Body(Enum):
    """How large a body a rule accepts (the sizes are settings)."""

    NONE = "none"  # GET and friends: any body is refused
    JSON = "json"  # VRS_GATEWAY_MAX_JSON_BODY_BYTES
    IMPORT = "import"  # CSV uploads: VRS_GATEWAY_MAX_IMPORT_BODY_BYTES


class Scope(Enum):
    ANY = "any"
    # ``{code}`` must be the caller's municipality; a stranger gets 403.
    OWN_MUNICIPALITY = "own"
    # As above, but a stranger gets the unknown-resident 404, so nobody learns whether another
    # municipality has a given resident.
    OWN_MUNICIPALITY_HIDDEN = "own-hidden"


@dataclass(frozen=True, slots=True)
class Rule:
    methods: frozenset[str]
    path: str  # the template; also the metrics label, so resident ids never become label values
    upstream: Upstream
    roles: frozenset[Role] | None  # None: anyone, anonymous included
    scope: Scope
    reads_personal_data: bool  # reads or writes an identified person's data → an audit entry
    purpose_field: str | None = None  # a JSON body field that states the legal basis (the audit's "why")
    purpose_items: str | None = None  # a JSON body list each of whose items states one in ``purpose_field``
    # A JSON body field holding a coupon line (in each item of the ``coupon_items`` list, a batch): the audit's
    # "whose data" is then the coupon's municipality, when the body's coupons are all one municipality's.
    coupon_field: str | None = None
    coupon_items: str | None = None
    body: Body | None = None  # None: NONE for GET/HEAD/DELETE, IMPORT for POST .../*-imports, else JSON
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(s[1:-1] for s in self.path.split("/") if s.startswith("{") and s.endswith("}"))
        object.__setattr__(self, "params", names)
        if self.body is None:
            if self.methods <= {"GET", "HEAD", "DELETE"}:
                body = Body.NONE
            elif self.path.rsplit("/", 1)[-1].endswith("-imports"):
                body = Body.IMPORT
            else:
                body = Body.JSON
            object.__setattr__(self, "body", body)
        if self.scope is not Scope.ANY and "code" not in names:
            raise ValueError(f"{self.path}: a municipality scope needs a {{code}} segment")


@dataclass(frozen=True, slots=True)
class Match:
    rule: Rule
    params: dict[str, str]


def rule(
    methods: str,
    path: str,
    upstream: Upstream,
    roles: Iterable[Role] | None,
    scope: Scope = Scope.ANY,
    *,
    reads_personal_data: bool = False,
    purpose_field: str | None = None,
    purpose_items: str | None = None,
    coupon_field: str | None = None,
    coupon_items: str | None = None,
    body: Body | None = None,
) -> Rule:
    return Rule(
        methods=frozenset(methods.split("|")),
        path=path,
        upstream=upstream,
        roles=None if roles is None else frozenset(roles),
        scope=scope,
        reads_personal_data=reads_personal_data,
        purpose_field=purpose_field,
        purpose_items=purpose_items,
        coupon_field=coupon_field,
        coupon_items=coupon_items,
        body=body,
    )


MUNICIPALITY = (Role.MUNICIPALITY,)
DOSE_WRITERS = (Role.INSTITUTION, Role.MUNICIPALITY)
ANYONE = None
_M = "/api/v1/municipalities/{code}"
REGISTRY, RECORDS, STATS, GATEWAY = Upstream.REGISTRY, Upstream.RECORDS, Upstream.STATS, Upstream.GATEWAY
OWN, OWN_HIDDEN = Scope.OWN_MUNICIPALITY, Scope.OWN_MUNICIPALITY_HIDDEN

# "Reads personal data" means the request reads or changes an identified person's record; each such request
# gets an audit entry (a dose is health data of the coupon's holder, so recording one is audited too).
POLICY: tuple[Rule, ...] = (
    # registry
    rule("PUT", f"{_M}/residents/{{resident_id}}", REGISTRY, MUNICIPALITY, OWN, reads_personal_data=True),
    rule("GET", f"{_M}/residents/{{resident_id}}", REGISTRY, MUNICIPALITY, OWN_HIDDEN, reads_personal_data=True),
    rule("POST", f"{_M}/resident-imports", REGISTRY, MUNICIPALITY, OWN, reads_personal_data=True),
    rule("GET", f"{_M}/resident-imports/{{import_id}}", REGISTRY, MUNICIPALITY, OWN),
    rule("POST", f"{_M}/residents/{{resident_id}}/move-out", REGISTRY, MUNICIPALITY, OWN, reads_personal_data=True),
    rule(
        "POST", f"{_M}/residents/{{resident_id}}/coupon-reissue", REGISTRY, MUNICIPALITY, OWN, reads_personal_data=True
    ),
    rule(
        "POST",
        f"{_M}/transfer-lookups",
        REGISTRY,
        MUNICIPALITY,
        OWN_HIDDEN,
        reads_personal_data=True,
        purpose_field="legal_basis",
    ),
    rule(
        "POST",
        f"{_M}/residents/{{resident_id}}/certificates",
        REGISTRY,
        MUNICIPALITY,
        OWN_HIDDEN,
        reads_personal_data=True,
    ),
    rule("GET", f"{_M}/residents/{{resident_id}}/fhir", REGISTRY, MUNICIPALITY, OWN_HIDDEN, reads_personal_data=True),
    # 情報提供等記録: the transfer lookups that read the resident's doses (who, when, on what basis)
    rule(
        "GET",
        f"{_M}/residents/{{resident_id}}/disclosures",
        REGISTRY,
        MUNICIPALITY,
        OWN_HIDDEN,
        reads_personal_data=True,
    ),
    # ...and the municipality's whole log, for a period (an audit of its My Number use)
    rule("GET", f"{_M}/disclosures", REGISTRY, MUNICIPALITY, OWN, reads_personal_data=True),
    # certificates: anyone may check a card (its holder shows it) and read the issuer's keys and revocations
    rule("POST", "/api/v1/certificates/verify", REGISTRY, ANYONE),
    rule("GET", "/issuer/.well-known/jwks.json", REGISTRY, ANYONE),
    rule("GET", "/issuer/.well-known/crl/{file}", REGISTRY, ANYONE),
    # A batch has a legal basis per item: the gateway reads every item's, audits the set and names it to
    # registry in X-Access-Purpose, which registry requires to cover every one the batch uses.
    rule(
        "POST",
        f"{_M}/transfer-lookups/batch",
        REGISTRY,
        MUNICIPALITY,
        OWN_HIDDEN,
        reads_personal_data=True,
        purpose_field="legal_basis",
        purpose_items="lookups",
    ),
    # records
    rule("POST", "/api/v1/doses", RECORDS, DOSE_WRITERS, reads_personal_data=True, coupon_field="coupon"),
    rule(
        "POST",
        "/api/v1/doses/batch",
        RECORDS,
        DOSE_WRITERS,
        reads_personal_data=True,
        coupon_field="coupon",
        coupon_items="doses",
    ),
    rule("POST", "/api/v1/dose-imports", RECORDS, DOSE_WRITERS, reads_personal_data=True),
    rule("GET", "/api/v1/dose-imports/{import_id}", RECORDS, DOSE_WRITERS),
    rule("GET", "/api/v1/coupons/{coupon}", RECORDS, DOSE_WRITERS),
    rule("GET", f"{_M}/doses", RECORDS, MUNICIPALITY, OWN, reads_personal_data=True),
    rule("POST", f"{_M}/doses/{{dose_id}}/corrections", RECORDS, MUNICIPALITY, OWN, reads_personal_data=True),
    # stats: anyone; stats itself keeps municipality-level cuts for the national role
    rule("GET", "/api/v1/stats/doses", STATS, ANYONE),
    rule("GET", "/api/v1/stats/coverage", STATS, ANYONE),
    rule("GET", "/api/v1/opendata/{file}", STATS, ANYONE),
    rule("GET", "/dashboard", STATS, ANYONE),
    rule("GET", "/dashboard/{asset}", STATS, ANYONE),  # the page's script files, served by stats
    # the gateway itself: a municipality reads the audit entries about its data or made by it
    rule("GET", f"{_M}/audit", GATEWAY, MUNICIPALITY, OWN),
)


@dataclass(eq=False)
class _Node:
    literals: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    param_name: str | None = None
    by_method: dict[str, Rule] = field(default_factory=dict)


class PolicyTable:
    """Rules indexed as a tree of path segments: a match costs a few dict look-ups, whatever the table size.

    A literal segment wins over a parameter at the same depth; the walk backs off to the parameter if the
    literal branch leads nowhere. Parameters never match an empty segment, ``.`` or ``..``.
    """

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._root = _Node()
        for r in self.rules:
            self._add(r)

    def _add(self, r: Rule) -> None:
        if not r.path.startswith("/"):
            raise ValueError(f"{r.path}: a path template starts with '/'")
        node = self._root
        for segment in r.path[1:].split("/"):
            if segment.startswith("{") and segment.endswith("}"):
                name = segment[1:-1]
                if node.param is None:
                    node.param, node.param_name = _Node(), name
                elif node.param_name != name:
                    raise ValueError(f"{r.path}: parameter {{{name}}} where another rule has {{{node.param_name}}}")
                node = node.param
            else:
                node = node.literals.setdefault(segment, _Node())
        for method in r.methods:
            if method in node.by_method:
                raise ValueError(f"{method} {r.path} is in the table twice")
            node.by_method[method] = r

    def match(self, method: str, path: str) -> Match | None:
        """The rule for ``method path`` (a percent-decoded path without query), or None."""
        if not path.startswith("/"):
            return None
        segments = path[1:].split("/")
        # First the walk's own first try — a literal where there is one, else the parameter — without recursion
        # (this runs for every request); the full walk with its back-offs only if that try leads nowhere.
        node, values = self._root, []
        for segment in segments:
            child = node.literals.get(segment)
            if child is None:
                if node.param is None or segment in _NOT_A_VALUE:
                    break
                values.append(segment)
                child = node.param
            node = child
        else:
            if (rule := node.by_method.get(method)) is not None:
                return Match(rule, dict(zip(rule.params, values, strict=True)))
        values = []
        found = _walk(self._root, segments, 0, method, values)
        if found is None:
            return None
        return Match(found, dict(zip(found.params, values, strict=True)))


# Segments a path parameter never takes (an empty or dot segment is a path trick, not an id).
_NOT_A_VALUE = frozenset({"", ".", ".."})


def _walk(node: _Node, segments: list[str], i: int, method: str, values: list[str]) -> Rule | None:
    if i == len(segments):
        return node.by_method.get(method)
    segment = segments[i]
    child = node.literals.get(segment)
    if child is not None and (found := _walk(child, segments, i + 1, method, values)) is not None:
        return found
    if node.param is not None and segment not in _NOT_A_VALUE:
        values.append(segment)
        if (found := _walk(node.param, segments, i + 1, method, values)) is not None:
            return found
        values.pop()
    return None


def authorize(match: Match, principal: Principal) -> None:
    """Raise what the caller gets if ``principal`` may not make this request; messages match the services'."""
    r = match.rule
    if r.roles is not None and principal.role not in r.roles:
        if principal.role is Role.ANONYMOUS:
            raise Unauthorized("a bearer token is required")
        raise Forbidden(f"role '{principal.role.value}' may not do this")
    if r.scope is not Scope.ANY and principal.municipality != match.params["code"]:
        if r.scope is Scope.OWN_MUNICIPALITY_HIDDEN:
            raise resident_not_found()
        raise Forbidden("this municipality is not yours")


TABLE = PolicyTable(POLICY)
