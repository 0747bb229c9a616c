"""The README's "Socket handoff" walkthrough, run as written: its shell steps and its handoff.toml.

Only the places are moved: /run/... into a temporary directory and port 443 to a free port,
so the test never needs the real ports or paths; every other character is the README's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support import ROOT, free_port, require, wait_until

README = ROOT / "README.md"


def readme_blocks() -> tuple[str, str]:
    text = README.read_text()
    section = text[text.index("## Socket handoff"):]
    section = section[:section.index("\n## ", 5)]
    sh = re.search(r"```sh\n(.*?)```", section, re.S)
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    assert sh is not None and toml is not None
    return sh.group(1), toml.group(1)


def test_readme_handoff_walkthrough(tmp_path: Path) -> None:
    require("openssl")
    require("curl")
    sh, toml = readme_blocks()
    port = free_port()

    def moved(text: str) -> str:
        return (text.replace("/run/", f"{tmp_path}/").replace("[::]:443", f"127.0.0.1:{port}")
                .replace(":443:", f":{port}:").replace("https://a.example.org/", f"https://a.example.org:{port}/"))

    (tmp_path / "handoff.toml").write_text(moved(toml))
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the steps run from a checkout
    pids = tmp_path / "pids"
    # Background steps record their PIDs, so the test stops exactly what it started.
    script = moved(sh).replace("&\n", f"& echo $! >> {pids}\n")
    curl_line = script.strip().splitlines()[-1]
    setup = script[: script.rindex(curl_line)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        subprocess.run(["bash", "-e", "-c", setup], cwd=tmp_path, env=env, check=True, timeout=60,
                       stdout=(tmp_path / "setup.log").open("wb"), stderr=subprocess.STDOUT)

        def answered() -> bool:
            r = subprocess.run(["bash", "-c", curl_line + " --max-time 5 -sS"], cwd=tmp_path, env=env,
                               capture_output=True, timeout=20)
            answered.out = r.stdout.decode()  # type: ignore[attr-defined]
            return r.returncode == 0

        assert wait_until(answered, 20), (tmp_path / "setup.log").read_text()
        out = answered.out  # type: ignore[attr-defined]
        fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        assert fields["served-by"] == "site-a" and fields["sni"] == "a.example.org", out
        assert fields["peer"] == fields["client"] and fields["peer"].startswith("127.0.0.1:"), out
    finally:
        for pid in pids.read_text().split() if pids.exists() else []:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
