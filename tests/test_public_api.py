"""The public surface: few names, each documented with a runnable example (doctests run them)."""

import importlib
import subprocess
import sys

import mdparam


def test_at_most_30_public_names_each_with_a_docstring_and_an_example():
    assert len(mdparam.__all__) <= 30
    assert len(set(mdparam.__all__)) == len(mdparam.__all__)
    for name in mdparam.__all__:
        obj = getattr(mdparam, name)
        if name == "__version__":
            assert isinstance(obj, str)
            continue
        assert ">>>" in (obj.__doc__ or ""), f"mdparam.{name} has no example in its docstring"


def test_the_deprecated_alias_module_is_gone():
    try:
        importlib.import_module("mdparam.views")
    except ModuleNotFoundError:
        return
    raise AssertionError("mdparam.views still imports")


def test_tensor_parallelism_loads_only_when_asked_for():
    code = (
        "import sys, mdparam; a = 'mdparam._tensor_parallel' in sys.modules; "
        "mdparam.parallelize_module; print(a, 'mdparam._tensor_parallel' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
