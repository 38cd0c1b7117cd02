"""What each key role may do, as the tokens auth_svc signs for it say (audiences and scopes:
cloudach.tokens). The public API's tokens never carry an admin scope: the one the edge forwards to
inference_svc is good there only, so whoever holds it cannot replay it at the admin RPCs or bill
anyone. Admin tokens are given only to a caller that asks for them (PURPOSE_ADMIN: the CLI)."""

from __future__ import annotations

from cloudach import tokens as t

MEMBER, ORG_ADMIN, PLATFORM_ADMIN, SERVICE = "member", "org_admin", "platform_admin", "service"
ROLES = (MEMBER, ORG_ADMIN, PLATFORM_ADMIN, SERVICE)
ADMIN_ROLES = (ORG_ADMIN, PLATFORM_ADMIN)
#: roles an organization admin may give (within its own organization)
ORG_ADMIN_MAY_CREATE = (MEMBER, ORG_ADMIN)

Grant = tuple[str | tuple[str, ...], tuple[str, ...]]  # (audience, scopes)


def _everywhere(role: str) -> tuple[str, ...]:
    return (t.ALL_ORGANIZATIONS,) if role == PLATFORM_ADMIN else ()


def api_grants(role: str) -> tuple[Grant, Grant | None]:
    """The public API's token and usage token (None: no usage token) of a key with role."""
    if role == SERVICE:
        return (t.BILLING_AUDIENCE, (t.USAGE_WRITE,)), None
    return (t.INFERENCE_AUDIENCE, (t.INFERENCE,)), (t.BILLING_AUDIENCE, (t.USAGE_READ, *_everywhere(role)))


def admin_grant(role: str) -> Grant | None:
    """The admin token of a key with role (None: the role has none)."""
    if role == SERVICE:
        # A service running batch jobs as the keys that made them (IssueKeyToken): asked for
        # apart, good at auth_svc only, so the token it sends billing_svc can mint nothing.
        return t.AUTH_AUDIENCE, (t.TOKENS_ISSUE,)
    if role not in ADMIN_ROLES:
        return None
    return (t.AUTH_AUDIENCE, t.BILLING_AUDIENCE), (t.KEYS_ADMIN, t.USAGE_READ, *_everywhere(role))
