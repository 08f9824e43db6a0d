"""Authentication, tenancy and the audit log, shared by every service.

Partners hold API keys (stored hashed, shown once, revocable, rotatable) sent as `Authorization: Bearer`.
Roles: `partner` (sees only its own cases), `specialist`, `operations`. Tables live in the `auth` schema.
"""

from services.auth.deps import AuthEngine, Caller, Principal, auth_engine, authenticate, require_role
from services.auth.models import Role

__all__ = ["AuthEngine", "Caller", "Principal", "Role", "auth_engine", "authenticate", "require_role"]
