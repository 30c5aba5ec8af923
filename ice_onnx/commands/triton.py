"""`ice-onnx triton`: write a Triton Inference Server model repository for a converted model."""

from __future__ import annotations

import click

from ice_onnx.commands import params
from ice_onnx.commands.convert import report_errors
from ice_onnx.errors import EXIT_FAILURE, EXIT_NO_ATTENTION, EXIT_USAGE, IceError
from ice_onnx.serving.triton import (DEFAULT_MAX_BATCH, NotConvertedError, ServingError, SettingsError, TritonSettings,
                                      write_repository)


@click.command("triton")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "repository", required=True, type=click.Path(),
              help="The model repository (created if missing; other models in it are left alone).")
@click.option("--name", help="The model's name in the repository (default: MODEL's file name without .ice.onnx).")
@click.option("--max-batch", type=params.count(min=0),
              help=f"max_batch_size, with dynamic batching; 0: none. Default: {DEFAULT_MAX_BATCH} when every input "
                   "and output starts with one dynamic batch dimension, else 0.")
@click.option("--instances", type=params.count(), default=TritonSettings.instances, show_default=True,
              help="CPU instances of the model (each its own ONNX Runtime session).")
@click.option("--threads", type=params.count(min=0), default=TritonSettings.threads, show_default=True,
              help="ONNX Runtime threads per instance (the backend's intra_op_thread_count); 0: its default.")
@click.option("--mount", metavar="DIR",
              help="Where the server sees the repository, e.g. /models in a container (the config names the "
                   "library by absolute path); default: the repository's absolute path here.")
@click.option("--replace", is_flag=True, help="Replace a model folder of that name (whole, in one step).")
def command(model, repository, name, max_batch, instances, threads, mount, replace) -> None:
    """Serve the converted MODEL with Triton: write REPO/NAME/ (config.pbtxt, 1/model.onnx, the op library)."""
    settings = TritonSettings(name=name, max_batch=max_batch, instances=instances, threads=threads, mount=mount,
                              replace=replace)
    with report_errors(failure="triton"):
        try:
            written = write_repository(model, repository, settings)
        except SettingsError as exc:
            raise IceError(str(exc), EXIT_USAGE) from None
        except NotConvertedError as exc:
            raise IceError(str(exc), EXIT_NO_ATTENTION) from None
        except ServingError as exc:
            raise IceError(f"cannot serve {model}: {exc}", EXIT_FAILURE) from None
    batching = "dynamic batching" if written.batched else "no batching"
    click.echo(f"wrote {written.folder} ({batching}; op library {written.library})")
