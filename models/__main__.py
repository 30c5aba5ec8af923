"""The recipes from one command line (run from the repository root).

    python -m models                    # the recipes, whether their model is built, where it is
    python -m models build smollm2      # make a recipe's model (a no-op when it is there)
    python -m models build listops --force
"""

from __future__ import annotations

import sys

import click

from .recipe import get, recipes


@click.group(invoke_without_command=True, help=__doc__)
@click.pass_context
def main(ctx) -> None:
    if ctx.invoked_subcommand is None:
        for recipe in recipes().values():
            state = "built" if recipe.is_built() else "not built"
            click.echo(f"{recipe.name:15} {state:10} {recipe.model_path()}\n{'':15} {recipe.summary}")


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="make it again even if it is there.")
def build(name: str, force: bool) -> None:
    """Make the model of recipe NAME unless it is there; print its path."""
    try:
        recipe = get(name)
    except KeyError as exc:
        raise click.UsageError(exc.args[0]) from None
    click.echo(recipe.build(force=force, log=lambda message: click.echo(message, err=True)))


if __name__ == "__main__":
    sys.exit(main())
