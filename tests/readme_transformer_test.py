"""The README's Transformer block ("Use on your own model", the second Python block) runs as
written: discovery finds the heads and FFN neurons of a user's NNX attention model, the compact
model equals the masked one, and `Pruner` takes token ids at a 50 % MACs budget."""
import contextlib
import io
import os
import re

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def transformer_example() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Use on your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section has the CNN block, then the Transformer block"
    return blocks[1]


@pytest.mark.slow  # a documentation example, like the notebooks (~12 CPU s)
def test_readme_transformer_example_finds_masks_and_cuts_out_heads():
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(transformer_example(), "README.md (Transformer)", "exec"), namespace)
    found, keep = namespace["found"], namespace["keep"]
    assert sorted((g.name, g.size) for g in found.groups) == [("params/attn/query", 4),
                                                             ("params/ffn1", 64)]
    assert "(32, 2, 8) compact - masked" in out.getvalue(), out.getvalue()
    pruner, ids = namespace["pruner"], namespace["ids"]
    assert float(pruner.cost.macs(keep)) <= pruner.budget  # keep: the threshold keep
    small_apply, small_vars = namespace["small_apply"], namespace["small_vars"]
    heads = small_vars["params"]["attn"]["query"]["kernel"].shape[1]
    assert heads == round(float(keep[0]) * 4) < 4
    masked = pruner.apply(pruner.params, pruner.batch_stats, ids, train=False, channel_masks={
        name: v.astype(np.float32) for name, v in pruner.channel_keep(keep).items()})[0]
    np.testing.assert_allclose(small_apply(small_vars, ids), masked, atol=2e-5)
