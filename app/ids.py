"""Opaque, time-ordered ids with a type prefix (``img_``, ``train_``, ``ckpt_``, ``ds_``)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    # 12 hex digits of milliseconds then 10 random: lexical order = creation order (newest-first lists sort by id).
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"
