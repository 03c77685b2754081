"""The console in a real headless Chromium against a real meshd.

The daemon is real (control socket, API, mesh, console); its llama-server is
``tests/harness/fakebackend.py`` behind a two-line wrapper in a temporary ``[llama]
bin_dir``, serving the real Gemma GGUF's name, so the test is quick and light.
The page is loaded with ``?model=...&prompt=...``, which makes it send one chat
message as soon as the model is warm; the test reads the DOM the script built
(node id, model, state, the streamed reply, the model's "why?"), watches a state
change arrive over the event stream, and takes a screenshot.
"""

from __future__ import annotations

import os
import signal
from urllib.parse import urlencode

import pytest

from tests.conftest import DEFAULT_MODEL_NAME as MODEL
from tests.conftest import free_port
from tests.harness.browser import Chromium
from tests.harness.daemon import Meshd, fake_llama_bin_dir


def js_string(text: str) -> str:
    import json

    return json.dumps(text)


@pytest.mark.timeout(180)
def test_console_page_in_a_real_browser(tmp_path, gemma_model_path, chromium_bin):
    console_port = free_port()
    node = Meshd(tmp_path / "node", {
        "models": {"serve": [gemma_model_path]},
        "llama": {"bin_dir": fake_llama_bin_dir(tmp_path, "--chunks", "12"), "restart_min_s": 3.0},
        "console": {"enabled": True, "listen": f"127.0.0.1:{console_port}"},
    })
    node.start()
    browser = None
    try:
        status = node.wait_model_warm(MODEL, timeout=60)
        node_id = status["node_id"]
        browser = Chromium(chromium_bin, tmp_path / "chromium-profile",
                           tmp_path / "chromium.log").start()
        query = urlencode({"model": MODEL, "prompt": "Say hello."})
        page = browser.open(f"http://127.0.0.1:{console_port}/?{query}")

        card = f"document.querySelector('[data-node-id={js_string(node_id)}]')"
        model_state = f"document.querySelector('[data-model={js_string(MODEL)}] .state')"
        browser.wait_for(page, f"{card} !== null", "this node's card")
        assert browser.wait_for(page, f"{model_state} && {model_state}.textContent",
                                "the model's state") == "warm"
        assert browser.wait_for(page, "document.getElementById('live').className === 'on'",
                                "the event stream")
        # the VRAM bars: advertised, and what the model uses (estimated: no NVML here)
        used_bar = f"{card}.querySelector('.bar.used')"
        source = browser.evaluate(page, f"{used_bar}.dataset.source")
        tooltip = browser.evaluate(page, f"{used_bar}.title")
        assert (source, tooltip.split(":")[0]) in (("model size", "estimate"),
                                                   ("nvml", "measured by NVML"))

        # the chat box sent the prompt and streamed the fake backend's 12 chunks
        reply = browser.wait_for(
            page,
            "(r => r && r.dataset.done === 'true' && r.textContent)"
            "(document.getElementById('reply-1'))",
            "the streamed reply",
        )
        assert reply.split() == [f"t{i}" for i in range(12)]

        # the model's why?: what `meshctl explain` says, fetched from /api/explain
        browser.evaluate(page, f"document.querySelector('button[data-why={js_string(MODEL)}]')"
                               ".click()")
        decision = browser.wait_for(
            page, "(p => p && p.textContent)(document.querySelector('[data-explain=decision]'))",
            "the model's explanation")
        assert decision.startswith("solo"), decision
        mine = browser.evaluate(
            page, f"document.querySelector('[data-explain-node={js_string(node_id)}]').textContent")
        assert "solo" in mine and "fits" in mine, mine

        dom = browser.evaluate(page, "document.documentElement.outerHTML")
        (tmp_path / "console.html").write_text(dom)
        assert node_id in dom and MODEL in dom and ">warm<" in dom

        png = browser.screenshot(page, tmp_path / "console.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
        print(f"screenshot: {tmp_path / 'console.png'} ({len(png)} bytes)")

        # a change reaches the open page over the event stream: llama-server dies, the
        # model shows it is not warm, then warm again once it is restarted
        pid = status["models"][0]["backend"]["pid"]
        os.kill(pid, signal.SIGKILL)
        print(f"killed llama-server pid {pid}")
        browser.wait_for(page, f"{model_state}.textContent !== 'warm'", "the model not warm",
                         timeout=15)
        browser.wait_for(page, f"{model_state}.textContent === 'warm'", "the model warm again",
                         timeout=30)

        # a clean stop with the page's event stream still open
        assert node.stop() == 0
        log = node.log()
        assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    finally:
        if browser is not None:
            browser.stop()
        node.stop()
