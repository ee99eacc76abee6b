"""wsgidav's If-header parser formats its debug line even when debug logging is off.

`wsgidav.util.parse_if_header_dict` ends with
`_logger.debug(f"...{pformat(ifDict)}")`: the f-string runs pprint on every
request with an If header (each PUT, PROPPATCH and UNLOCK under a lock, the
Explorer sequence) whatever the log level, about a tenth of such a request's
CPU. The module's `pformat` is used for nothing else, so it is replaced with
one that formats only when that logger would print the line.
"""
from __future__ import annotations

import logging
import pprint

from wsgidav import util


def _pformat_when_debugging(obj: object, *args, **kwargs) -> str:
    if util._logger.isEnabledFor(logging.DEBUG):
        return pprint.pformat(obj, *args, **kwargs)
    return "(not formatted: debug logging is off)"


def install() -> None:
    """Idempotent: safe to call once per server built."""
    util.pformat = _pformat_when_debugging
