"""``InitSpec``: the one parser of the init grammar, ``auto | scratch:arch[.tag] | name[.tag] | path``.

Fine-tuning, studies, the leakage checks, the quick start and prediction all take a string that
says where a model's weights come from. Each used to parse it on its own, and they disagreed: a
study mapped ``auto`` to ``mednet_gray`` for every target, the leakage check chose by channels.
Here is the single rule, and each of them calls it:

=============================== ==============================================================
``auto``                        the shipped pre-trained MedNet for the target's channels:
                                1 -> ``mednet_gray``, 3 -> ``mednet_color`` (:meth:`InitSpec.resolve`)
``scratch:<arch>``              random weights of a registered architecture
``scratch:<arch>.<tag>``        random weights shaped like weight set ``<arch>.<tag>`` (its width)
``<name>`` / ``<name>.<tag>``   a registered model's pre-trained weights (default or named tag)
``<path>``                      an existing file or folder (``save_pretrained`` output, its model
                                card, or a bare weights file); a bare name that is both an
                                existing folder and a registered model is refused as ambiguous
                                (write ``./name``); a missing path is an error, never a name
=============================== ==============================================================

Parsing checks the grammar and the file system (and, for that ambiguity, whether the name is a
registered architecture); whether a weight set is registered is the registry's question (``create_model`` / ``get_pretrained_cfg`` raise with a suggestion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openmednet.models._registry import is_model

__all__ = ["AUTO_BY_CHANNELS", "InitSpec"]

#: What ``auto`` means, by the target's channels.
AUTO_BY_CHANNELS = {1: "mednet_gray", 3: "mednet_color"}

#: Suffixes that make a string a path even when the file is missing (then: FileNotFoundError).
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".json")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_][A-Za-z0-9_\-]*)?$")

InitKind = Literal["auto", "scratch", "pretrained", "path"]


@dataclass(frozen=True)
class InitSpec:
    """A parsed init string.

    Attributes:
        kind: ``auto``, ``scratch`` (random weights), ``pretrained`` (registered weights) or
            ``path`` (weights on disk).
        name: ``arch`` or ``arch.tag`` for ``scratch`` and ``pretrained``; ``None`` otherwise.
        path: the file or folder for ``path``; ``None`` otherwise.
        text: the string as given (what run directories and reports are named by).
    """

    kind: InitKind
    name: str | None = None
    path: Path | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str | Path) -> InitSpec:
        """Parse ``text`` (see the module docstring for the grammar).

        Raises:
            ValueError: empty, ``scratch:`` without a name, an unknown ``prefix:``, or a malformed
                name.
            FileNotFoundError: ``text`` looks like a path (a ``/`` or a weights suffix) but does
                not exist.
        """
        raw = str(text)
        text = raw.strip()
        if not text:
            raise ValueError("empty init: expected auto, scratch:<arch>[.<tag>], <model>[.<tag>] or a path")
        if text == "auto":
            return cls("auto", text=text)
        if text.startswith("scratch:"):
            name = text.removeprefix("scratch:")
            if not _NAME.match(name):
                raise ValueError(f"init {raw!r}: expected scratch:<arch> or scratch:<arch>.<tag>, e.g. scratch:mednet_gray")
            return cls("scratch", name=name, text=text)
        path = Path(text).expanduser()
        if path.exists():
            if _NAME.match(text) and is_model(text):
                # A run folder named like a model in the working directory must not silently
                # replace the registered weights (or the reverse): make the user say which.
                raise ValueError(
                    f"init {raw!r} is both a registered model and a folder in {Path.cwd()}: write "
                    f"./{text} for the folder, or rename it to use the registered weights"
                )
            return cls("path", path=path, text=text)
        if "/" in text or "\\" in text or text.lower().endswith(WEIGHT_FILE_SUFFIXES):
            raise FileNotFoundError(f"init weights not found: {text} (no such file or folder)")
        prefix, colon, _ = text.partition(":")
        if colon:
            raise ValueError(
                f"init {raw!r}: unknown prefix '{prefix}:' (the only prefix is 'scratch:'; an ImageNet "
                f"baseline is its plain name, e.g. efficientnet_lite0)"
            )
        if not _NAME.match(text):
            raise ValueError(f"init {raw!r} is not a model name (<arch> or <arch>.<tag>), 'auto', scratch:<arch> or an existing path")
        return cls("pretrained", name=text, text=text)

    def resolve(self, channels: int) -> InitSpec:
        """``auto`` made concrete for a target with ``channels`` channels; other kinds unchanged.

        Raises:
            ValueError: ``auto`` with channels other than 1 or 3.
        """
        if self.kind != "auto":
            return self
        if channels not in AUTO_BY_CHANNELS:
            raise ValueError(f"init 'auto' needs 1 (gray) or 3 (colour) channels, got {channels}: name the init")
        return InitSpec("pretrained", name=AUTO_BY_CHANNELS[channels], text=self.text)

    @property
    def arch(self) -> str | None:
        """Architecture of ``name`` (``"mednet_gray"`` of ``"mednet_gray.sup_v1"``)."""
        return None if self.name is None else self.name.partition(".")[0]

    @property
    def tag(self) -> str | None:
        """Weight tag of ``name`` (``"sup_v1"``), ``None`` when it has none."""
        return None if self.name is None else (self.name.partition(".")[2] or None)

    @property
    def pretrained(self) -> bool:
        """Whether the init brings trained weights (everything but ``scratch``)."""
        return self.kind != "scratch"
