"""The ``vllm`` caption backend (optional extra ``synrep[vllm]``): same interface and output as
``transformers``, for GPU throughput at the paper's scale. Every request carries its own seed,
derived from the call's seed and its position, so results do not depend on vLLM's batching.
"""

from __future__ import annotations

from collections.abc import Sequence

from synrep.captions.base import BACKENDS, CaptionBackend, Query, Sampling
from synrep.captions.hf import check_model_path
from synrep.errors import ConfigError
from synrep.utils import derive_seed


@BACKENDS.register("vllm")
class VLLMBackend(CaptionBackend):
    name = "vllm"

    def __init__(self, cfg, device: str = "cuda") -> None:
        try:
            import vllm
        except ImportError:
            raise ConfigError("captions.backend=vllm needs the vllm package: "
                              "pip install 'synrep[vllm]' (GPU machines)") from None
        check_model_path(cfg.model, "vllm")
        self.model = cfg.model
        self._vllm = vllm
        self.llm = vllm.LLM(model=cfg.model, dtype=cfg.dtype, seed=0)

    def generate(self, queries: Sequence[Query], sampling: Sampling, seed: int) -> list[str]:
        params = [self._vllm.SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, stop=["\n"], seed=derive_seed(seed, i) % (1 << 31))
            for i in range(len(queries))]
        outs = self.llm.generate([q.prompt for q in queries], params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]
