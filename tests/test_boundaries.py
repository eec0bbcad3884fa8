"""The adapter boundary holds: outside ``nsvit_fast/models/`` no code reaches into the timm model.

A grep, so it also catches code that no test runs. Allowed outside models/: the adapter's own
interface (``nsvit_fast/models/base.py``), and handing the whole wrapped module to a library that
takes any nn.Module (``ModelEmaV3(parts.model)``): that reads no internals.
"""

import re
from pathlib import Path

import nsvit_fast

PACKAGE = Path(nsvit_fast.__file__).resolve().parent

# attribute access through the wrapped model, and timm internals by name
FORBIDDEN = {
    r"\.model\.\w": "reaches into the wrapped timm model (.model.<attr>)",
    r"\bgetattr\(\s*[\w.]+\.model\s*,|\bgetattr\(\s*[\w.]+\s*,\s*[\"']model[\"']":
        "reaches into the wrapped timm model (getattr)",
    r"pretrained_cfg|default_cfg": "reads timm's pretrained config: use Adapter.data_config",
    r"\bfused_attn\b": "flips timm's attention switch: use Adapter.encode_with_attention",
    r"\.blocks\b": "walks timm's blocks: use Adapter.encode_with_attention / encode_with_hidden",
    r"\.(cls_token|reg_token|dist_token|pos_embed|_pos_embed|patch_embed\.proj)\b":
        "reads timm's tokens: use the adapter's geometry, has_class_token, patch_projection",
    r"resolve_model_data_config|resolve_data_config": "reads timm's data config: use Adapter.data_config",
}


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "models":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, why in FORBIDDEN.items():
                if re.search(pattern, code):
                    out.append(f"nsvit_fast/{rel}:{no}: {why}: {line.strip()}")
    return out


def test_nothing_outside_models_sees_past_the_adapter():
    bad = violations()
    assert not bad, "\n".join(bad)


def test_the_grep_finds_what_it_forbids(tmp_path):
    # the check can fail: each kind of leak, written into a copy of a module, is reported
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vit.py").write_text("x = parts.model.blocks[0].attn.fused_attn\n")  # allowed there
    leaks = ["has_cls = getattr(parts.model, 'cls_token', None) is not None",
             "crop = parts.model.pretrained_cfg['crop_pct']",
             "for blk in parts.blocks: pass",
             "attn.fused_attn = False",
             "cfg = resolve_model_data_config(m)"]
    (tmp_path / "leaky.py").write_text("\n".join(leaks) + "\nok = parts.encode(u)  # parts.model.blocks in a comment\n")
    bad = violations(tmp_path)
    assert [b.split(":")[1] for b in bad] == ["1", "2", "2", "3", "4", "5"], bad
