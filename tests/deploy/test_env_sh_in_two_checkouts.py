"""scripts/env.sh: sourced in a shell that already sourced another checkout's, it uses its own venv
and state folder (a fresh clone's set-up must not install into the other checkout's venv), and it
keeps what the user set on purpose."""

from __future__ import annotations

import shutil
import subprocess

from sparktf_dev.testing import ROOT


def sourced(tmp_path, script: str) -> list[str]:
    for checkout in ("first", "second"):
        (tmp_path / checkout / "scripts").mkdir(parents=True)
        shutil.copy(ROOT / "scripts" / "env.sh", tmp_path / checkout / "scripts" / "env.sh")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "-c", f"set -euo pipefail; {script}"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_a_second_checkout_uses_its_own_venv_and_state(tmp_path):
    venv, state = sourced(tmp_path, 'source first/scripts/env.sh; source second/scripts/env.sh; echo "$VENV $SPARKTF_STATE_DIR"')
    assert (venv, state) == (str(tmp_path / "second" / ".venv"), str(tmp_path / "second" / ".stack"))


def test_a_venv_set_on_purpose_is_kept(tmp_path):
    [venv] = sourced(tmp_path, 'export VENV=/opt/team-venv; source first/scripts/env.sh; source second/scripts/env.sh; echo "$VENV"')
    assert venv == "/opt/team-venv"
