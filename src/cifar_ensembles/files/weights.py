"""ImageNet weights for `resnet18`, fetched once as a workflow artifact, never during training.

Downloads use torchvision's published URL and torch.hub's check of the SHA-256 prefix that
the file name carries (resnet18-f37072fd.pth); a local file is checked by loading it into
the architecture.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from .atomic import atomic_path


def default_url() -> str:
    from torchvision.models import ResNet18_Weights

    return ResNet18_Weights.IMAGENET1K_V1.url


def check_resnet18_state(path: str | os.PathLike) -> None:
    """Fail with one line unless `path` holds a torchvision ResNet-18 state dict."""
    from torchvision.models import resnet18

    from ..models import load_pretrained

    load_pretrained(resnet18(weights=None, num_classes=10), path)


def fetch_weights(out: str | os.PathLike, url: str | None = None, local_file: str | None = None) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        if local_file:
            if not Path(local_file).is_file():
                raise UserError(f"pretrained_weights.file: {local_file}: no such file")
            try:
                shutil.copyfile(local_file, tmp)
            except OSError as err:
                raise UserError(f"pretrained_weights.file: {local_file}: cannot copy it to {out}: "
                                f"{err.strerror or err}") from None
        else:
            url = url or default_url()
            match = re.search(r"-([a-f0-9]{8,})\.", os.path.basename(url))
            try:
                torch.hub.download_url_to_file(url, str(tmp), hash_prefix=match.group(1) if match else None,
                                               progress=False)
            except RuntimeError as err:  # torch.hub's hash mismatch
                raise UserError(f"pretrained_weights.url: {url}: {err}") from None
            except OSError as err:
                raise UserError(f"pretrained_weights.url: cannot download {url}: {err}") from None
        try:
            check_resnet18_state(tmp)
        except UserError as err:  # name the user's file or URL and field, not the temporary copy
            where = (f"pretrained_weights.file: {local_file}" if local_file
                     else f"pretrained_weights.url: {url}")
            raise UserError(f"{where}: {str(err).split(f'{tmp}: ', 1)[-1]}") from None
    return out
