"""Every error the reference API answers on purpose, each a status, a code and a message.

    ApiError
    ├── BadRequest            400  malformed_json, invalid_body, invalid_parameter, invalid_id,
    │                              invalid_idempotency_key
    ├── Unauthorized          401  missing_token, invalid_token
    ├── NotFound              404  unknown_dataset, record_not_found, not_found
    ├── MethodNotAllowed      405  method_not_allowed
    ├── Conflict              409  id_conflict
    ├── PayloadTooLarge       413  body_too_large
    ├── Unprocessable         422  unknown_field, missing_field, read_only_field, invalid_value,
    │                              id_mismatch, constraint_violated, invalid_query, invalid_filter,
    │                              invalid_operator, invalid_group_by, invalid_metric,
    │                              too_many_groups, idempotency_key_reused
    └── ServiceUnavailable    503  database_unavailable

Messages name what is wrong (the field, parameter or header) and never echo a record value:
answers are logged by clients and proxies, and values are health data.
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An answer other than success, sent as ``{"error": {"code": ..., "message": ...}}``."""

    status = 500

    def __init__(self, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class NotFound(ApiError):
    status = 404


class MethodNotAllowed(ApiError):
    status = 405


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    status = 422


class ServiceUnavailable(ApiError):
    status = 503
