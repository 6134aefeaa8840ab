"""User mistakes end in one line on stderr naming the file, field or option; exit != 0; no traceback.

Each runs the real CLI in a subprocess on real files in tmp_path. `evaluate` mistakes are caught
before Prefect is even imported: the subprocess reports whether any Prefect module got loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.builders import make_adapter

# Runs the CLI's main in this process, then says how it ended and whether Prefect, flows/ or tasks/ got imported.
RUN_MAIN = """
import json, sys
from dpo_eval.cli.main import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
orchestration = ("dpo_eval.flows", "dpo_eval.tasks")  # the flow and task modules import prefect
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "prefect" or m.split(".")[:2] in
                ([*o.split(".")] for o in orchestration))
print(json.dumps({"code": code, "orchestration_modules": loaded}))
sys.exit(code)
"""


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dpo_eval", *map(str, args)], capture_output=True, text=True)


def run_main(*args) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, "-c", RUN_MAIN, *map(str, args)], capture_output=True, text=True)
    return result, json.loads(result.stdout.splitlines()[-1])


def assert_one_line(result, *names):
    """Exit status != 0 and exactly one stderr line, no traceback, naming each of `names`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("dpo-eval: error: ")
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def adapter(stories260k, tmp_path_factory):
    return make_adapter(stories260k, tmp_path_factory.mktemp("cli-errors") / "adapter")


@pytest.fixture
def trl_jsonl(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Tell story {i}.", "chosen": "Short. Clear.", "rejected": "Long and then long."}
            for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_forced_format_whose_fields_are_missing(trl_jsonl, tmp_path):
    result = run_cli("pairs", "--dataset", trl_jsonl, "--format", "orca", "--out", tmp_path / "p.parquet")
    assert_one_line(result, trl_jsonl, "record 1", "orca format (--format)", "['question']")


def test_malformed_prompt_template(stories260k, trl_jsonl, tmp_path):
    result = run_cli("generate", "--base", stories260k, "--dataset", trl_jsonl, "--out", tmp_path / "a.parquet",
                     "--prompt-template", "{% if system %}{{ prompt }}")
    assert_one_line(result, "--prompt-template", "not a valid Jinja template")


def test_missing_config_file(tmp_path):
    result = run_cli("evaluate", "--config", tmp_path / "eval.yaml")
    assert_one_line(result, f"--config {tmp_path / 'eval.yaml'}", "no such file")


@pytest.mark.parametrize("text, problem", [
    ("model:\n  base: [unclosed\n", "malformed YAML (line 3"),
    ("- dataset\n- model\n", "expected a YAML mapping"),
    ("model:\n  bas: gpt2\n", "model.bas: Extra inputs are not permitted"),
])
def test_malformed_config_file(tmp_path, text, problem):
    config = tmp_path / "eval.yaml"
    config.write_text(text)
    result = run_cli("evaluate", "--config", config)
    assert_one_line(result, f"--config {config}", problem)


def test_debug_shows_the_original_traceback(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("model:\n  base: [unclosed\n")
    result = run_cli("evaluate", "--config", config, "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "yaml.parser.ParserError" in result.stderr
    assert "DpoEvalError: --config" in result.stderr


def test_malformed_adapter_config_before_any_prefect_import(stories260k, adapter, trl_jsonl, tmp_path):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": 4,,\n}')
    result, status = run_main("evaluate", "--base", stories260k, "--adapter", broken, "--dataset", trl_jsonl,
                              "--out", tmp_path / "run")
    assert_one_line(result, broken / "adapter_config.json", "malformed JSON (line 2")
    assert status["code"] != 0 and status["orchestration_modules"] == []


def test_missing_adapter_before_any_prefect_import(stories260k, trl_jsonl, tmp_path):
    result, status = run_main("evaluate", "--base", stories260k, "--dataset", trl_jsonl, "--out", tmp_path / "run")
    assert_one_line(result, "--adapter is required")
    assert status["code"] != 0 and status["orchestration_modules"] == []


@pytest.mark.parametrize("kind, named", [
    ("missing", "no such file or folder"),
    ("malformed", "line 2: malformed JSON"),
    ("hub", "loading it as a Hugging Face Hub data set failed"),  # offline here (conftest): unreachable
])
def test_unreadable_data_set_before_any_prefect_import(stories260k, adapter, tmp_path, kind, named):
    data = "someone/no-such-preferences" if kind == "hub" else tmp_path / "prefs.jsonl"
    if kind == "malformed":
        data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a",\n')
    result, status = run_main("evaluate", "--base", stories260k, "--adapter", adapter, "--dataset", data,
                              "--out", tmp_path / "run")
    assert_one_line(result, data, named)
    assert status["code"] != 0 and status["orchestration_modules"] == []


@pytest.mark.parametrize("command", ["evaluate", "pairs"])
def test_a_data_set_whose_every_record_is_left_out_is_one_line_before_any_prefect_import(stories260k, adapter,
                                                                                       tmp_path, command):
    data = tmp_path / "same.jsonl"  # chosen == rejected everywhere: every record is left out
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"}) + "\n"
                            for i in range(3)))
    model = ["--base", stories260k, "--adapter", adapter] if command == "evaluate" else []
    result, status = run_main(command, *model, "--dataset", data, "--out", tmp_path / "out")
    assert_one_line(result, data, "no usable pair: 3 records read")
    assert "3 chosen identical to rejected" in result.stderr
    assert status["code"] != 0 and status["orchestration_modules"] == []  # no server, no model


@pytest.mark.parametrize("judges, named", [
    ({"judge": {"model": "some-judge", "api_key_env": "DPO_EVAL_TEST_NEVER_SET"}},
     "--api-key-env DPO_EVAL_TEST_NEVER_SET: the variable is unset"),
    ({"judge": {"kind": "hf", "model": "./no-such-judge"}}, "judge.model (hf judge) ./no-such-judge: no such folder"),
    ({"reward_model": "./no-such-reward-model"}, "reward_model ./no-such-reward-model: no such folder"),
])
def test_judges_in_the_config_are_checked_before_any_prefect_import(stories260k, adapter, trl_jsonl, tmp_path,
                                                                    judges, named):
    import yaml

    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"source": str(trl_jsonl)},
                                      "model": {"base": str(stories260k), "adapter": str(adapter)}, **judges}))
    result, status = run_main("evaluate", "--config", config, "--out", tmp_path / "run")
    assert_one_line(result, named)
    assert status["code"] != 0 and status["orchestration_modules"] == []  # before any server, model or generation


def test_trend_on_a_folder_that_is_not_a_run(tmp_path):
    result = run_cli("trend", tmp_path, "--out", tmp_path / "trend")
    assert_one_line(result, tmp_path, "not a dpo-eval run directory")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"config": {}}')
    result = run_cli("trend", tmp_path, "--out", tmp_path / "trend")
    assert_one_line(result, tmp_path / "summary.json", "not the summary of a finished dpo-eval run")
