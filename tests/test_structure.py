"""The package's shape: no import cycles (module- or function-level), and a wheel that works
without the repository (experiments/ is not part of the library)."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "diffusion_jax"


def package_modules() -> dict:
    """{dotted module name: path} of every module of the package (packages as their __init__)."""
    modules = {}
    for path in (REPO / PACKAGE).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: pathlib.Path, modules: dict) -> set:
    """The package's modules that importing or running `name` imports: every import statement,
    at module level or inside a function, with the packages whose __init__ it runs (a package
    that contains `name` is already being imported, so it is no edge)."""
    is_package = path.name == "__init__.py"
    found = set()

    def add(target: str):
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                found.add(prefix)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            add(source)
            for alias in node.names:  # `from pkg import submodule`
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}")
    return found


def find_cycle(graph: dict):
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_walk_sees_function_level_and_package_imports(tmp_path):
    modules = {"p": tmp_path / "p/__init__.py", "p.a": tmp_path / "p/a.py", "p.sub": tmp_path / "p/sub/__init__.py",
               "p.sub.b": tmp_path / "p/sub/b.py"}
    source = tmp_path / "p/a.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from p.sub.b import g\n    from p import sub\n")
    assert imported_modules("p.a", source, modules) == {"p.sub", "p.sub.b"}


def test_no_import_cycles_in_the_package():
    modules = package_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert "diffusion_jax.losses" in graph["diffusion_jax.training.step"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def readme_layers() -> dict:
    """{module or package name: layer} from the README's layer list (between its layer markers)."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
    layers = {}
    for line in block.strip().strip("`").strip().splitlines():
        number, _, rest = line.partition(" ")
        for word in rest.split():  # the layer's title, then the names of its modules and packages
            if (REPO / PACKAGE / f"{word}.py").exists() or (REPO / PACKAGE / word).is_dir():
                layers[f"{PACKAGE}.{word}"] = int(number)
    return layers


def layer_of(module: str, layers: dict):
    """The layer of a module: its own entry, else that of the package it is in (None: unlisted)."""
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        if ".".join(parts[:i]) in layers:
            return layers[".".join(parts[:i])]
    return None


def test_every_import_points_down_the_layers_of_the_readme():
    layers = readme_layers()
    assert layers[f"{PACKAGE}.errors"] == 0 and layers[f"{PACKAGE}.cli"] == 10, layers
    modules = package_modules()
    unlisted = sorted(m for m in modules if m != PACKAGE and layer_of(m, layers) is None)
    assert not unlisted, f"place these modules in the README's layer list: {unlisted}"
    upward = []
    for name, path in modules.items():
        if name == PACKAGE:
            continue  # the package's facade (dj.*) re-exports from every layer
        for target in imported_modules(name, path, modules):
            if target != PACKAGE and layer_of(target, layers) > layer_of(name, layers):
                upward.append(f"{name} (layer {layer_of(name, layers)}) imports {target} "
                              f"(layer {layer_of(target, layers)})")
    assert not upward, "imports that point up:\n  " + "\n  ".join(sorted(upward))


def test_reading_a_run_imports_no_training_loop_data_or_generation():
    out = subprocess.run([sys.executable, "-c", "import diffusion_jax.runs, sys; print(sorted(m for m in sys.modules "
                          "if m.startswith(('diffusion_jax.training', 'diffusion_jax.data', 'diffusion_jax.generat'))))"],
                         capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout


def test_the_library_does_not_import_experiments_or_tests():
    for path in (REPO / PACKAGE).rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        bad = [m for m in names if m.split(".")[0] in ("experiments", "tests", "benchmarks")]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.slow
def test_wheel_installed_outside_the_repository_trains(tmp_path):
    """`pip install .` as a wheel, run from another directory: --help, then `train` with an
    experiment file given by its path (experiments/ is not installed)."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True)
    wheel = next(wheels.glob("diffusion_jax-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info"))
    assert installed == ["diffusion_jax"], installed
    # The dependencies come from this environment's site-packages, but not its editable
    # install of the repository (a .pth file of a directory on PYTHONPATH is not processed).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *deps]), "XLA_FLAGS": xla_flags(1),
           "JAX_PLATFORMS": "cpu"}
    python = [sys.executable, "-S"]  # -S: no site module, so no editable finder either
    where = subprocess.run(python + ["-c", "import diffusion_jax, sys; print(diffusion_jax.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    helped = subprocess.run(python + ["-m", "diffusion_jax", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "sample" in helped.stdout, helped.stderr
    trained = subprocess.run(
        python + ["-m", "diffusion_jax", "train", "--config", str(REPO / "experiments" / "digits_unet.py"),
                  "--workdir", str(elsewhere / "run"), "--config.train.steps=3", "--config.train.progress=False",
                  "--config.data.batch_size=16", "--config.model.name=dit_tiny"],  # the small model compiles fast
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "starting a new run" in trained.stdout
    assert (elsewhere / "run" / "checkpoints" / "3").is_dir()
