"""The kernel contract is written once: the Python code tables equal the C++ enums of
csrc/common/contract.h, and no other file (Python, C++, CUDA) spells a table of its own."""
from __future__ import annotations

import pathlib
import re

from kdfast.backends import _contract

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "csrc" / "common" / "contract.h"

#: C++ enum → (Python table, enumerator name for each option)
ENUMS = {
    "Normalize": (_contract.NORMALIZE_CODES, {"none": "kNormNone", "layernorm": "kNormLayerNorm", "l2": "kNormL2",
                                              "standardize": "kNormStandardize"}),
    "TeacherMode": (_contract.TEACHER_CODES, {"none": "kTeacherNone", "softmax": "kTeacherSoftmax",
                                              "partial": "kTeacherPartial"}),
    "Divergence": (_contract.DIVERGENCE_CODES, {"forward_kl": "kDivForwardKL", "reverse_kl": "kDivReverseKL",
                                                "mixed_kl": "kDivMixedKL", "jsd": "kDivJSD", "tvd": "kDivTVD",
                                                "skew_forward_kl": "kDivSkewForwardKL",
                                                "skew_reverse_kl": "kDivSkewReverseKL"}),
    "GramKind": (_contract.GRAM_KIND_CODES, {"smooth_l1": "kGramSmoothL1", "sq_fro": "kGramSquared"}),
}


def cpp_enum(name: str) -> dict[str, int]:
    body = re.search(rf"enum {name} : int \{{([^}}]*)\}}", CONTRACT.read_text())
    assert body, f"enum {name} not found in {CONTRACT}"
    return {key: int(value) for key, value in re.findall(r"(\w+)\s*=\s*(\d+)", body.group(1))}


def test_python_tables_equal_the_cpp_enums():
    for enum, (table, names) in ENUMS.items():
        values = cpp_enum(enum)
        assert set(names) == set(table), enum
        assert {option: values[names[option]] for option in table} == table, enum


def test_no_second_copy_of_a_code_table():
    """Only _contract.py (Python) and contract.h (C++) define the codes."""
    offenders = []
    for path in [*ROOT.joinpath("kdfast").rglob("*.py"), *ROOT.joinpath("csrc").rglob("*.*")]:
        if path.name in ("_contract.py", "contract.h") or "_csrc" in path.parts:
            continue
        text = path.read_text(errors="replace")
        if re.search(r"""["']layernorm["']\s*:\s*1|["']smooth_l1["']\s*:\s*0|["']partial["']\s*:\s*2|["']jsd["']\s*:\s*3""", text):
            offenders.append(str(path.relative_to(ROOT)))
        if re.search(r"enum \w+ : int(64_t)? \{\s*k(Norm|Teacher|Gram|Div)", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
