"""``loomnet route`` against a real executor (the embedded model) in another process."""

import re

import pytest

from tests.e2e.test_cli import env, executor_process, run  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.model]


def test_route_ranks_explains_and_fails_with_one_line(executor_process, env):  # noqa: F811
    _, ready = executor_process
    peer = re.search(r"peer id : (\S+)", ready).group(1)

    ok = run(env, "route", "SmolLM2-135M", "--prompt", "Name a colour.", "--max-tokens", "16", "--explain")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("route: model 'SmolLM2-135M', best; ") and "1 candidate(s), 0 left out" in lines[0]
    assert lines[1].strip() == f"1. smollm2-135m on {peer}"
    assert lines[2].strip().startswith("best: 0.000000 credits (") and "tok/s" in lines[2]
    assert "left out: none" in ok.stdout

    # a filter that leaves the only offer out: listed with its reason, then the error line
    left_out = run(env, "route", "fastest", "--capability", "vision", "--explain", "--wait", "2")
    assert left_out.returncode == 1
    assert f"- smollm2-135m on {peer}: lacks a capability the route needs (has chat; needs vision)" in left_out.stdout
    assert left_out.stderr.strip().startswith("error [400 NO_OFFER]: no live offer qualifies for this route")
    assert len(left_out.stderr.strip().splitlines()) == 1 and "Traceback" not in left_out.stderr

    unknown = run(env, "route", "openai:no-such-model", "--explain", "--wait", "1")
    assert unknown.returncode == 1 and "no live offer names the model 'openai:no-such-model'" in unknown.stdout
    assert "live models: smollm2-135m" in unknown.stderr

    bad = run(env, "route", "category:")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error [209 BAD_REQUEST]: 'category:' needs")
