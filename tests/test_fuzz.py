"""The quick fuzz run: a few thousand generated programs and mutants of every example, each
through parse, lowering, -O2, dump, summary, ONNX export and (when small) the interpreter,
must all end accepted or in one clear, placed message (tests/fuzzing.py is the long run)."""

import time

import fuzzing
import pytest

from cnnc.errors import CnncError, LayerError, Location, Source

SEED = 20261129
GENERATED = 2000
MUTANTS_PER_EXAMPLE = 8


@pytest.fixture(scope="module")
def report() -> fuzzing.Report:
    # No resource bombs here: tests/test_limits.py refuses each one by name, and the long
    # run (python tests/fuzzing.py) mixes them in.
    settings = fuzzing.Settings(bombs=False)
    generated = fuzzing.inputs(GENERATED, SEED, settings, mutants_share=0.0)
    mutants = fuzzing.example_mutants(MUTANTS_PER_EXAMPLE, SEED, settings)
    return fuzzing.fuzz([*generated, *mutants], time_limit=5.0)


def test_every_fuzzed_input_is_accepted_or_gets_one_placed_message(report):
    failures = "\n\n".join(
        f"{key} ({origin}, stage {outcome.stage}): {outcome.detail}\n--- input ---\n{text}"
        f"\n--- traceback ---\n{outcome.trace}"
        for key, (outcome, text, origin) in report.failures.items()
    )
    assert report.counts["tried"] == GENERATED + MUTANTS_PER_EXAMPLE * len(fuzzing.EXAMPLES)
    assert report.counts[fuzzing.OTHER] == 0, failures
    assert report.counts[fuzzing.TIMEOUT] == 0, failures
    assert report.counts[fuzzing.ACCEPTED] + report.counts[fuzzing.CLEAR] == report.counts["tried"]


def test_the_generator_mostly_writes_networks_that_compile_and_run(report):
    # Junk would pass the test above at the parser: most generated programs must compile
    # and run, and most of the rest must fail in lowering, past the parser.
    assert report.share("generated", fuzzing.ACCEPTED) >= 0.30, report.text()
    assert report.share("generated", "error in lower") >= 0.35, report.text()
    assert report.share("generated", "error in parse") <= 0.25, report.text()


def test_mutants_of_the_examples_reach_lowering_and_acceptance(report):
    assert report.by_origin["mutated example", "tried"] == MUTANTS_PER_EXAMPLE * len(
        fuzzing.EXAMPLES
    )
    assert report.share("mutated example", fuzzing.ACCEPTED) >= 0.2, report.text()
    assert report.share("mutated example", "error in lower") >= 0.1, report.text()


def test_generation_and_mutation_are_deterministic_for_a_seed():
    settings = fuzzing.Settings(bombs=True)
    first = list(fuzzing.inputs(50, 7, settings))
    assert first == list(fuzzing.inputs(50, 7, settings))
    assert first != list(fuzzing.inputs(50, 8, settings))


def test_an_exception_that_is_not_a_cnnc_error_is_a_failure_at_its_place(monkeypatch):
    def crash(text, state):
        state["stage"] = "lower"
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(fuzzing, "run_pipeline", crash)
    outcome = fuzzing.run_one("network n(x: 1x8) { relu }")
    assert outcome.kind == fuzzing.OTHER
    assert outcome.detail == "ZeroDivisionError: division by zero"
    assert outcome.where.startswith("tests/test_fuzz.py:") or "test_fuzz.py:" in outcome.where
    assert "ZeroDivisionError" in outcome.trace


def test_a_program_error_without_a_place_breaks_the_one_message_contract(monkeypatch):
    def unplaced(text, state):
        state["stage"] = "lower"
        raise LayerError("conv out must be positive, got 0")

    monkeypatch.setattr(fuzzing, "run_pipeline", unplaced)
    outcome = fuzzing.run_one("network n(x: 1x8) { relu }")
    assert outcome.kind == fuzzing.OTHER
    assert outcome.detail == (
        "LayerError (an error without a place): conv out must be positive, got 0"
    )


def test_a_placed_program_error_is_a_clear_error():
    outcome = fuzzing.run_one("network n(x: 1x8x8) {\n    conv(0, 3)\n}\n")
    assert outcome.kind == fuzzing.CLEAR
    assert outcome.detail == "LayerError: conv out must be positive, got 0"
    assert outcome.stage == "lower"


def test_the_message_check_wants_the_fuzzed_file_and_a_line_and_column():
    placed = LayerError("bad", Location(Source(fuzzing.FILENAME, "relu\n"), 1, 1))
    assert fuzzing.check_message(placed, program_error=True) is None
    elsewhere = LayerError("bad", Location(Source("other.cnn", "relu\n"), 1, 1))
    assert "no file:line:col place" in fuzzing.check_message(elsewhere, program_error=True)
    file_only = CnncError("cannot read", "weights.npz")
    assert fuzzing.check_message(file_only, program_error=False) is None
    assert "no file:line:col place" in fuzzing.check_message(file_only, program_error=True)


def test_an_input_over_the_time_limit_is_stopped_and_counted(monkeypatch):
    def slow(text, state):
        state["stage"] = "interpreter"
        time.sleep(2)

    monkeypatch.setattr(fuzzing, "run_pipeline", slow)
    start = time.perf_counter()
    outcome = fuzzing.run_one("network n(x: 1x8) { relu }", time_limit=0.2)
    assert time.perf_counter() - start < 1.0
    assert outcome.kind == fuzzing.TIMEOUT
    assert outcome.stage == "interpreter"
