"""`ice-onnx demo`: the main job on one screen — a real LLM (SmolLM2-135M-Instruct, built by
`make smollm2`) answering questions over a long document, original vs converted, with the
time of each; or, as the fast fallback, the small shipped line-retrieval model. The logic
is in ice_onnx/demo/."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ice_onnx.commands import params
from ice_onnx.demo import smollm2
from ice_onnx.demo.prompts import FACTS
from ice_onnx.errors import EXIT_USAGE, IceError
from ice_onnx.models.smollm2 import texts
from ice_onnx.outputs import refuse_unwritable, write_text

MODELS = ("smollm2", "line-retrieval")


@click.command("demo")
@click.option("--model", type=click.Choice(MODELS), help="The model to race  [default: smollm2, or line-retrieval "
              "when SmolLM2 is not built]")
@click.option("--tokens", type=params.count(min=64), help="Length of each prompt in tokens  [default: smollm2 "
              f"{smollm2.DEFAULT_TOKENS}, line-retrieval 4096]")
@click.option("--questions", type=params.count(), help="Questions to answer  [default: smollm2 "
              f"{smollm2.DEFAULT_QUESTIONS} (at most {len(FACTS)}), line-retrieval 5]")
@click.option("--new-tokens", default=smollm2.DEFAULT_NEW_TOKENS, show_default=True, type=params.count(),
              help="smollm2: tokens each answer decodes greedily.")
@click.option("--text", type=click.Choice(texts.names(texts.HELD_OUT)), default=smollm2.DEFAULT_TEXT, show_default=True,
              help="smollm2: the held-out text the document comes from.")
@click.option("--smollm2-dir", type=click.Path(file_okay=False, path_type=Path),
              help="smollm2: the build folder  [default: $ICE_ONNX_SMOLLM2, else ./.cache/smollm2]")
@click.option("--threads", default=2, show_default=True, type=params.count())
@click.option("--top-k", type=params.attribute(min=1), help="Keys per query in kNN mode  [default: smollm2 "
              "convert's default, line-retrieval 32 with kNN from 0 keys]")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              help="smollm2: also write the report (answers, token ids, times) here as JSON.")
def command(model, tokens, questions, new_tokens, text, smollm2_dir, threads, top_k, json_file) -> None:
    """Race a converted LLM against the original on long-document questions."""
    say = lambda message: click.echo(message, err=True)  # noqa: E731 - progress goes to stderr
    where = smollm2.locate(smollm2_dir) if model != "line-retrieval" else None
    if model == "smollm2" and where is None:
        raise IceError(f"SmolLM2 is not built in {' or '.join(map(str, smollm2.candidates(smollm2_dir)))}: "
                       "run `make smollm2` in the checkout (or give --smollm2-dir)")
    if where is None:
        if model is None:
            say("SmolLM2 is not built (make smollm2): the shipped line-retrieval model instead")
        if json_file is not None:
            raise IceError("--json is for the smollm2 demo", EXIT_USAGE)
        from ice_onnx.demo import line_retrieval

        line_retrieval.run(tokens or line_retrieval.DEFAULT_TOKENS, questions or line_retrieval.DEFAULT_QUESTIONS,
                           threads, top_k or line_retrieval.DEFAULT_TOP_K, say)
        return

    from ice_onnx.rewriter import ConvertOptions

    questions = questions or smollm2.DEFAULT_QUESTIONS
    if questions > len(FACTS):
        raise IceError(f"--questions: at most {len(FACTS)} for smollm2", EXIT_USAGE)
    refuse_unwritable(json_file)  # before the work, not after it
    report = smollm2.run(where, tokens=tokens or smollm2.DEFAULT_TOKENS, questions=questions, new_tokens=new_tokens,
                         text=text, threads=threads,
                         options=ConvertOptions(top_k=top_k) if top_k else ConvertOptions(), say=say)
    click.echo("\n" + smollm2.render(report))
    if json_file is not None:
        write_text(json_file, json.dumps(report, indent=1) + "\n")
