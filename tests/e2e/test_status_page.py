"""The live status page in a real browser (Debian's headless Chromium through Selenium):
it shows what ``/status`` says, charts rates (requests per minute, tokens per second:
back to 0 when traffic stops, never negative after a restart), hides its admin controls
until an admin token is accepted, and with it switches the backend that serves a model
and sets its price, which a client over py-libp2p then sees (its next
answer comes from the new backend; the next advert carries the new price). Nothing the
page loads comes from anywhere but the executor."""

from __future__ import annotations

import functools
import shutil

import pytest
import trio

from loomnet.protocol import ChatMessage

from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI
from .test_admin_actions import TOKEN, offer_of, run_executor

pytestmark = pytest.mark.integration

from selenium import webdriver  # noqa: E402  (the test extras: make test)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HI = [ChatMessage("user", "hi")]
#: one poll of /status by hand; the chart's rates after it, [requests/min, tokens/s] each
POLL = "const done = arguments[arguments.length - 1]; poll().then(() => done(rates.map(r => [r.requests, r.tokens])));"
#: the page's rate of change between two polls: after a restart, after a counter reset, for the same uptime
RESETS = """return [rateOf({uptime: 100, served: 50, tokens: 500}, {uptime: 4, served: 2, tokens: 40}),
                 rateOf({uptime: 10, served: 50, tokens: 500}, {uptime: 12, served: 5, tokens: 30}),
                 rateOf({uptime: 12, served: 5, tokens: 30}, {uptime: 12, served: 5, tokens: 30})];"""


def browser():
    if not (CHROMIUM and DRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)


async def test_the_page_shows_the_status_and_switches_a_backend(nursery, tmp_path, monkeypatch):
    from loomnet.client import ClientConfig, LoomClient
    from loomnet.node._admin import ModelChange
    from loomnet.node.config import PoolBackend

    env = {"ADMIN_TOKEN": TOKEN}
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    desk, hosted = FakeOpenAI(flavour="vllm", pieces=["from desk"]), FakeOpenAI(flavour="vllm", pieces=["from hosted"])
    desk_url, hosted_url = await serve_app(nursery, desk), await serve_app(nursery, hosted)
    executor = await run_executor(nursery, tmp_path, desk_url, env)
    await executor.admin.add_backend({"name": "hosted", "provider": "vllm", "endpoint": f"{hosted_url}/v1",
                                      "models": ["m1"]})  # fmt: skip
    await executor.admin.set_model("chat-m", ModelChange(backends=[PoolBackend(backend="desk", model="m1"),
                                                                   PoolBackend(backend="hosted", model="m1")]))  # fmt: skip
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                     discover_local=False, offer_timeout=10.0))  # fmt: skip
    await nursery.start(client.run)
    assert (await client.chat(HI, model="chat-m")).text == "from desk"
    url = executor.info.operator_url

    def look_and_switch() -> dict:
        driver = browser()
        try:
            wait = WebDriverWait(driver, 30)
            driver.set_script_timeout(30)
            driver.get(url + "/")
            wait.until(EC.text_to_be_present_in_element((By.ID, "peer"), executor.peer_id))
            wait.until(EC.text_to_be_present_in_element((By.ID, "models"), "chat-m"))
            seen = {
                "models": driver.find_element(By.ID, "models").text,
                "backends": driver.find_element(By.ID, "backends").text,
                "summary": driver.find_element(By.ID, "summary").text,
                "earnings": driver.find_element(By.ID, "earnings").text,
                "chart": len(driver.find_elements(By.CSS_SELECTOR, "#chart polyline")),
            }
            # the chart plots rates: positive while requests come, back to 0 once they stop
            for _ in range(2):
                trio.from_thread.run(functools.partial(client.chat, HI, model="chat-m"))
            wait.until(lambda d: any(r > 0 and t > 0 for r, t in d.execute_async_script(POLL)))
            wait.until(lambda d: d.execute_async_script(POLL)[-1] == [0, 0])
            seen["rates"] = driver.execute_async_script(POLL)
            seen["line"] = driver.find_element(By.CSS_SELECTOR, "#chart .series-requests").get_attribute("data-values")
            seen["reset"] = driver.execute_script(RESETS)
            # without an accepted token the admin controls are hidden; a wrong one is refused and they stay so
            hidden = ("switch-chat-m", "set-price-chat-m", "toggle-desk", "drain")
            seen["hidden before"] = [driver.find_element(By.ID, i).is_displayed() for i in hidden]
            driver.find_element(By.ID, "token").send_keys("wrong-token-0123456789abc")
            driver.find_element(By.ID, "use-token").click()
            wait.until(EC.text_to_be_present_in_element((By.ID, "message"), "refused (401)"))
            seen["hidden after a wrong token"] = [driver.find_element(By.ID, i).is_displayed() for i in hidden]
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "use-token").click()
            wait.until(EC.visibility_of_element_located((By.ID, "switch-chat-m")))
            seen["shown"] = [driver.find_element(By.ID, i).is_displayed() for i in hidden]
            Select(driver.find_element(By.ID, "serve-chat-m")).select_by_value("hosted")
            driver.find_element(By.ID, "switch-chat-m").click()
            wait.until(EC.text_to_be_present_in_element((By.ID, "message"), "/admin/models/chat-m: done"))
            wait.until(EC.text_to_be_present_in_element((By.ID, "models"), "hosted (closed) > desk"))
            price = driver.find_element(By.ID, "price-out-chat-m")
            price.clear()
            price.send_keys("4")
            driver.find_element(By.ID, "set-price-chat-m").click()
            wait.until(EC.text_to_be_present_in_element((By.ID, "models"), "0 / 4"))
            seen["after"] = driver.find_element(By.ID, "models").text
            # a token refused later (changed on the executor, here in the tab) hides the controls again
            driver.execute_script("sessionStorage.setItem('loomnet-admin-token', 'wrong-token-0123456789abc')")
            driver.find_element(By.ID, "toggle-desk").click()
            wait.until(EC.invisibility_of_element_located((By.ID, "toggle-desk")))
            seen["message"] = driver.find_element(By.ID, "message").text
            return seen
        finally:
            driver.quit()

    seen = await trio.to_thread.run_sync(look_and_switch)
    assert "offered" in seen["models"] and "desk (closed) > hosted (closed)" in seen["models"]
    assert "desk" in seen["backends"] and "hosted" in seen["backends"] and "healthy" in seen["backends"]
    assert "serving" in seen["summary"] and "day" in seen["earnings"] and seen["chart"] == 2
    # rates, not totals: never negative, up while requests came, 0 once they stopped
    assert all(r >= 0 and t >= 0 for r, t in seen["rates"]) and seen["rates"][-1] == [0, 0]
    assert max(r for r, _ in seen["rates"]) > 0 and max(t for _, t in seen["rates"]) > 0
    assert seen["line"].split()[-1] == "0.000" and len(seen["line"].split()) == len(seen["rates"])
    # a restart (uptime went down) counts from zero; a counter gone down is a reset; a stale answer plots nothing
    assert seen["reset"] == [{"requests": 30, "tokens": 10}, {"requests": 150, "tokens": 15}, None]
    assert seen["hidden before"] == seen["hidden after a wrong token"] == [False] * 4 and seen["shown"] == [True] * 4
    assert "refused (401)" in seen["message"]
    # the switch and the price reached the network: the next answer and the next advert
    await offer_of(client, "chat-m", price_out=4_000_000)
    assert (await client.chat(HI, model="chat-m")).text == "from hosted"


async def test_the_page_is_self_contained(nursery, tmp_path, monkeypatch):
    import httpx

    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    desk = FakeOpenAI(flavour="vllm")
    executor = await run_executor(nursery, tmp_path, await serve_app(nursery, desk), {"ADMIN_TOKEN": TOKEN})
    async with httpx.AsyncClient(base_url=executor.info.operator_url) as http:
        page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    text = page.text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace: a name, not a fetch
    assert "http://" not in text and "https://" not in text and "src=" not in text
    assert "innerHTML" not in page.text  # /status text is never parsed as HTML
