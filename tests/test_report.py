"""`raykd report`: the quickstart's page (the job made small by the `tracked_run` fixture), one
self-contained HTML file, rendered in a real headless browser (Debian's chromium; `make test`
installs it when it runs as root)."""
import re
import shutil
import subprocess

import matplotlib.image

from conftest import RAYKD

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the report test needs a browser: `make test` installs chromium as root; " \
        "otherwise sudo apt-get install chromium"
    return found


def render(page, tmp_path, *args) -> tuple[str, str]:
    """(DOM after the page's script ran, console lines); extra args e.g. --screenshot=F."""
    done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args,
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, "\n".join(console)


def test_report_renders_every_figure_and_table_without_console_errors(tracked_run, tmp_path):
    run_dir = tracked_run.run_dir
    done = subprocess.run([RAYKD, "report", str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    page = run_dir / "report.html"
    text = page.read_text()
    assert not re.search(r'(src|href)="(?!data:|#)', text), "self-contained: nothing to fetch"
    for section in ("Results", "Learning curves", "Loss-weight schedules",
                    "Tang et al.'s diagnostics"):
        assert f"<h2>{section}</h2>" in text
    dom, console = render(page, tmp_path, "--dump-dom")
    body = re.search(r"<body ([^>]*)>", dom).group(1)
    # accuracy bars, validation curves, training-loss curves, EDT weights, Tang histograms
    assert 'data-figures="5"' in body and 'data-tables="1"' in body, body
    assert "± " in dom and "seed0-kd" not in dom.split("<h2>Learning curves")[0]
    assert console == "", console
    shot = tmp_path / "report.png"
    render(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,3000")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200) and pixels[..., :3].std() > 0.05, "not a blank page"
    # the console check can fail: a page whose script throws is caught
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    assert "undefinedFunction" in render(broken, tmp_path, "--dump-dom")[1]
