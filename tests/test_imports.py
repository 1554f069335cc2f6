"""The package's layering (no folder or top-level module imports one that imports it back, directly or around) and
imports without process-wide side effects."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import defectscope

PACKAGE = Path(defectscope.__file__).parent


def unit(module: str) -> str:
    """defectscope.detectors.base -> 'detectors'; defectscope.pipeline -> 'pipeline' (its folder, or itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def unit_imports() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: an importing statement as 'module -> module'}; lazy imports inside functions count."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("defectscope", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("defectscope.") and unit(name) != unit(module):
                    graph[unit(module)].setdefault(unit(name), f"{module} -> {name}")
    return graph


def cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as its edges, or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in graph.get(node, {}):
            if state.get(target) == "open":
                loop = path[path.index(target):] + [target]
                return [graph[a][b] for a, b in zip(loop, loop[1:])]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    return next((found for node in list(graph) if node not in state and (found := visit(node))), None)


def test_no_folder_imports_one_that_imports_it_back() -> None:
    graph = unit_imports()
    assert {"detectors", "pipeline", "scale", "service"} <= set(graph)  # the walk found the package
    assert cycle(graph) is None, cycle(graph)


def test_the_cycle_finder_finds_a_loop_around_three() -> None:
    graph = {"a": {"b": "a.x -> b.y"}, "b": {"c": "b.y -> c"}, "c": {"a": "c -> a.x"}, "d": {"a": "d -> a"}}
    assert cycle(graph) == ["a.x -> b.y", "b.y -> c", "c -> a.x"]
    assert cycle({"a": {"b": "a -> b"}, "b": {}}) is None


def test_importing_the_package_changes_nothing_process_wide() -> None:
    probe = ("import os, cv2, defectscope, defectscope.data.decode, defectscope.pipeline, defectscope.cli\n"
             "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), cv2.getNumThreads() == before,"
             " cv2.utils.logging.getLogLevel())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = subprocess.run([sys.executable, "-c", "import cv2; before = cv2.getNumThreads()\n" + probe],
                         capture_output=True, text=True, env=env, timeout=120)
    level = subprocess.run([sys.executable, "-c", "import cv2; print(cv2.utils.logging.getLogLevel())"],
                           capture_output=True, text=True, env=env, timeout=60).stdout.split()
    assert run.stdout.split() == ["None", "None", "True", *level], run.stderr


def test_the_cli_and_rays_workers_get_the_thread_and_allocator_policies(monkeypatch, cli) -> None:
    from defectscope.process import worker_environment
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert cli("--version").code == 0 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["GOMP_SPINCOUNT"] == "10000"  # a short spin bridges the gaps between a pass's operators
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a value the user set wins, in the workers too
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert worker_environment() == {"env_vars": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000",
                                                 "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "0",
                                                 "MALLOC_ARENA_MAX": "1"}}


def test_a_block_one_thread_freed_is_reused_by_another() -> None:
    """Under the allocator policy every thread allocates from one arena: a 40 MB block the main thread freed is reused
    by a worker thread (a shard's coreset, a search's scan); with an arena a thread, that thread faults its own in."""
    probe = ("import ctypes, resource, threading\n"
             "from defectscope.process import configure_allocator\n"
             "configure_allocator()\n"
             "libc = ctypes.CDLL(None)\nlibc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]\n"
             "def once():\n    block = libc.malloc(40 << 20)\n    ctypes.memset(block, 1, 40 << 20)\n    libc.free(block)\n"
             "once()\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "worker = threading.Thread(target=once)\nworker.start()\nworker.join()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    faults = {arenas: int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                                         check=True, env={**env, **({"MALLOC_ARENA_MAX": arenas} if arenas else {})}).stdout)
              for arenas in ("8", None)}  # a value the user set wins: 8 arenas; else the policy's one
    assert faults["8"] > 8_000 and faults[None] < 1_000, faults  # 40 MB is 10,240 pages of 4 KB


def test_a_large_block_freed_is_not_mapped_and_zero_filled_again() -> None:
    """Under the allocator policy (the CLI's) a large block freed (a backbone pass's activations) stays in the heap for
    the next one; by glibc's default each is a new mapping whose every page faults again."""
    probe = ("import ctypes, resource, sys\n"
             "from defectscope.process import configure_allocator\n"
             "if sys.argv[1] == 'policy':\n    configure_allocator()\n"
             "libc = ctypes.CDLL(None)\nlibc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]\n"
             "def once():\n    block = libc.malloc(200 << 20)\n    ctypes.memset(block, 1, 200 << 20)\n    libc.free(block)\n"
             "once()\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\nonce()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    faults = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, env=env,
                                       timeout=60, check=True).stdout) for mode in ("default", "policy")}
    assert faults["default"] > 40_000 and faults["policy"] < 1_000, faults  # 200 MB is 51,200 pages of 4 KB


def test_the_heaps_free_pages_go_back_to_the_system_between_phases() -> None:
    """Under the allocator policy a freed block below a live one stays resident (the frame search's features under the
    fit's); `release_free_heap`, called between a fit's phases, gives its pages back."""
    probe = ("import ctypes\n"
             "from defectscope.process import configure_allocator, release_free_heap\n"
             "configure_allocator()\n"
             "libc = ctypes.CDLL(None)\nlibc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]\n"
             "def resident():\n    return int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
             "block = libc.malloc(100 << 20)\nctypes.memset(block, 1, 100 << 20)\n"
             "above = libc.malloc(1 << 20)\nctypes.memset(above, 1, 1 << 20)\n"
             "libc.free(block)\nfreed = resident()\nrelease_free_heap()\nprint(freed - resident())\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    given_back = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                                    env=env).stdout)
    assert given_back >= 90, given_back  # MB of the 100 freed
