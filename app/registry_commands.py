"""``hdm`` commands that change the registries: models and adapters import, adapter merge, API keys
(app/cli.py builds the parser)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("hdm")


def load_settings():  # type: ignore[no-untyped-def]
    from app.db import reset_caches
    from app.settings import get_settings

    reset_caches()
    return get_settings()


def cmd_models_import(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.services import models, registry

    load_settings()
    with session_scope() as session:
        try:
            ckpt = models.register_file(session, Path(args.path), name=args.name, revive=args.revive)
        except registry.Deleted as exc:
            log.error("%s (--revive)", exc)
            return 2
        print(ckpt.id, ckpt.name)
    return 0


def cmd_adapters_import(args: argparse.Namespace) -> int:
    """This service's own adapter files are registered where they are; any other format is converted into the
    models folder's ``adapters/`` (app/services/adapter_imports.py). Both are shared."""
    from app.db import session_scope
    from app.errors import ServiceError
    from app.services import adapter_imports, adapters, registry

    settings = load_settings()
    path = Path(args.path)
    with session_scope() as session:
        try:
            if adapters.is_adapter_file(path) and args.base_model is None:
                row = adapters.register_file(session, path, name=args.name, revive=args.revive)
            else:
                row = adapter_imports.import_file(
                    session,
                    path,
                    path.name,
                    name=args.name,
                    owner=None,
                    base_model=args.base_model,
                    dest_dir=settings.models_dir / "adapters",
                    source="import",
                )
        except (ValueError, OSError, ServiceError, registry.Deleted) as exc:
            log.error("%s", getattr(exc, "message", exc))
            return 2
        print(row.id, row.name)
    return 0


def adapter_weight(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` (weight 1 when absent; a path may itself contain ':')."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def cmd_adapters_merge(args: argparse.Namespace) -> int:
    from hdm_core.adapters.merge import merge_checkpoint
    from hdm_core.adapters.network import AdapterError
    from hdm_core.checkpoint import CheckpointError

    try:
        out = merge_checkpoint(args.base, [adapter_weight(a) for a in args.adapters], args.out)
    except (AdapterError, CheckpointError, OSError) as exc:
        log.error("%s", exc)
        return 2
    print(out)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    import hashlib
    import secrets

    from app.db import session_scope, utcnow
    from app.ids import new_id
    from app.models import ApiKey

    load_settings()
    key = "hdm_" + secrets.token_urlsafe(32)
    with session_scope() as session:
        row = ApiKey(
            id=new_id("key"),
            name=args.name,
            key_sha256=hashlib.sha256(key.encode()).hexdigest(),
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        print(row.id, key)  # shown once; only its hash is stored
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from app.db import session_scope, utcnow
    from app.models import ApiKey

    load_settings()
    with session_scope() as session:
        row = session.get(ApiKey, args.id)
        if row is None:
            log.error("no key %s", args.id)
            return 1
        row.revoked_at = utcnow()
    return 0
