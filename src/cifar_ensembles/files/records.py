"""Error plumbing for the files the workflow writes and reads back, and the typed-JSON base.

Every format module in this folder builds on these: a damaged or missing file of our own is
named in one line with how to rebuild it (`DamagedFile`), never a traceback; torch files are
read with `weights_only=True`, so reading them never runs code; a JSON record is tagged with
its format and checked field by field, then as a whole.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import ClassVar

from ..config.convert import from_data, to_data
from ..errors import UserError
from .atomic import write_json


def rebuild_hint(path: str | os.PathLike) -> str:
    return f"rebuild it with: snakemake --forcerun {path}"


class DamagedFile(UserError):
    """A file the workflow wrote itself is missing, truncated or edited into something else."""

    def __init__(self, path, problem: str, hint: str | None = None):
        super().__init__(f"{path}: {problem}; {hint or rebuild_hint(path)}")


def _weights_only_reason(text: str) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    refused = re.search(r"GLOBAL (\S+)", text)
    if refused:
        return (f"its pickle asks for {refused.group(1).rstrip('.')}, which is refused "
                "(only tensors and plain data are read)")
    after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    lines = [line.strip() for line in after.splitlines()
             if line.strip() and not line.strip().startswith("Check the documentation")]
    return f"the weights-only reader refuses it: {(lines or ['unsupported content'])[0][:200]}"


def error_line(err: BaseException) -> str:
    """`err` in one line: its type and first line (torch's can span many). The advice torch and
    numpy give for a file that holds code (load it unsafely) is not passed on."""
    text = str(err).replace("\x1b[1m", "").replace("\x1b[0m", "").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        return f"{err.__class__.__name__}: {_weights_only_reason(text)}"
    if "load it unsafely" in text:  # numpy, of a file that is a bare pickle
        return f"{err.__class__.__name__}: a pickle, not an array; refused (allow_pickle=False)"
    return f"{err.__class__.__name__}: {(lines or [''])[0][:200]}"


def load_weights_only(path: str | os.PathLike):
    """`torch.load(path, weights_only=True)` onto the CPU, without torch's warnings (a pickle
    protocol it does not expect makes it warn before it fails): one line is all a bad file gives."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_torch_file(path, what: str, hint: str | None = None) -> dict:
    try:
        obj = load_weights_only(path)
    except FileNotFoundError:
        raise DamagedFile(path, "missing", hint) from None
    except Exception as err:  # truncated zip, a pickle that is not plain data, ...
        raise DamagedFile(path, f"not a readable {what} ({error_line(err)})", hint) from None
    return obj


def typed_body(tp, value, path, what: str, hint: str | None = None):
    try:
        return from_data(tp, value, "")
    except UserError as err:
        raise DamagedFile(path, f"damaged {what} ({err})", hint) from None


def check_format(obj, expected: str, path, what: str, hint: str | None = None) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != expected:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DamagedFile(path, f"not a {what} (format {found!r}, expected {expected!r})", hint)
    return {k: v for k, v in obj.items() if k != "format"}


class JsonRecord:
    """A typed JSON file the workflow writes and reads back: tagged with its FORMAT, checked
    field by field on load, then as a whole (`_misfit`: what does not fit together)."""

    FORMAT: ClassVar[str]
    WHAT: ClassVar[str]

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, {"format": self.FORMAT, **to_data(self)})

    @classmethod
    def load(cls, path: str | os.PathLike):
        body = check_format(read_json(path, cls.WHAT), cls.FORMAT, path, cls.WHAT)
        record = typed_body(cls, body, path, cls.WHAT)
        misfit = record._misfit()
        if misfit:
            raise DamagedFile(path, f"damaged {cls.WHAT} ({misfit})")
        return record

    def _misfit(self) -> str | None:
        return None


def read_json(path: str | os.PathLike, what: str):
    """Parsed JSON; NaN and Infinity are refused (the workflow never writes them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not a finite number")

    try:
        return json.loads(Path(path).read_text(), parse_constant=refuse)
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DamagedFile(path, f"not a readable {what} ({error_line(err)})") from None

