"""compress trust: allow model directories that name your own factory to be loaded on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from compressor.models import user_code

from .output import out


def trust(
    factory: Annotated[str, typer.Argument(help="package.module:factory, as recorded in model.json's arch.name.")],
):
    """Trust a factory of your own code (package.module:function) so that model directories naming it load here.

    Reading a model directory never runs code on the directory's say-so: a factory runs once you have named it
    on this machine, here or with --model on any command. This imports the module now (it runs its code) and
    prints its file and SHA-256."""
    user_code.split(factory)
    fp = user_code.fingerprint(factory)
    user_code.factory(factory)  # refuses a missing attribute before anything is remembered
    user_code.trust(factory)
    out.print(f"trusted {factory} ({fp['file']}, sha256 {fp['sha256']})")
