"""The Gradio demo (app/demo.py): the plain generate() function, a real HTTP round trip with gradio_client,
and a headless Chromium session through Selenium (skipped when /usr/bin/chromium is absent)."""
from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_class_unet
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZE = 16                                   # the tiny models' resolution
SHOWN = SIZE * (256 // SIZE)                # the demo enlarges images to at least 256 px

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*Pandas.*"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def load_demo():
    spec = importlib.util.spec_from_file_location("fewstep_app_demo", ROOT / "app" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_mod():
    return load_demo()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny 16x16 teacher (DDIM) and, under runs/, an older 4-step and one-step student and a newer 2-step one."""
    from diffusers import DDIMScheduler
    from fewstep_pipelines import FewStepClassPipeline

    from fewstep.run.folders import save_pipeline_dir
    from fewstep.run.schedulers import fewstep_scheduler_for

    root = tmp_path_factory.mktemp("demo")
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                          set_alpha_to_one=False, timestep_spacing="trailing")
    tiny_class_unet(sample_size=SIZE).save_pretrained(root / "teacher" / "unet")
    sched.save_pretrained(root / "teacher" / "scheduler")
    for name, tlist in (("old4", [999, 749, 499, 249]), ("one1", [999]), ("new2", [999, 499])):
        pipe = FewStepClassPipeline(unet=tiny_class_unet(sample_size=SIZE), scheduler=fewstep_scheduler_for(sched.config, tlist))
        save_pipeline_dir(pipe, root / "runs" / name)
    for name in ("old4", "one1"):
        os.utime(root / "runs" / name / "model_index.json", (1e9, 1e9))
    return root / "teacher", root / "runs" / "new2", root / "runs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(demo):
    """Launch ``demo`` on a free local port; returns its URL."""
    _, url, share = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                quiet=True, ssr_mode=False)
    assert url.startswith("http://127.0.0.1:") and share is None
    return url


@pytest.fixture
def served(demo_mod, dirs):
    teacher, student, runs = dirs
    demo = demo_mod.build_demo(teacher, runs_dir=runs)         # the student default: newest under runs/
    yield serve(demo)
    demo.close()
    gc.collect()   # gradio leaves event loops behind: let their ResourceWarnings fire under this test's filters


def slider_props(demo, elem_id: str = "steps") -> dict:
    """The initial settings of the component with ``elem_id``, as the page receives them."""
    return next(c["props"] for c in demo.config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def test_generate_function_and_messages(demo_mod, dirs):
    teacher, student, runs = dirs
    assert demo_mod.newest_student(runs) == student
    t, s, msg = demo_mod.generate(teacher, student, 3, "", 2, 5, 2.0, 8)
    assert t.size == s.size == (SHOWN, SHOWN) and "teacher: 8 steps" in msg and " ms" in msg
    again = demo_mod.generate(teacher, student, 3, "", 2, 5, 2.0, 8)
    assert np.array_equal(np.array(again[1]), np.array(s))       # same seed, same student image
    cases = {(teacher, runs / "missing", 3, 2, 0): "No student model found",
             (teacher, "", 3, 2, 0): "No student model found",
             (teacher, student, 42, 2, 0): "Class must be",
             (teacher, student, 3, 3, 0): "Student steps must be",     # trained for 2 steps
             (teacher, student, 3, 2, -1): "Seed must be"}
    for (t_dir, s_dir, label, steps, seed), expected in cases.items():
        t, s, msg = demo_mod.generate(t_dir, s_dir, label, "", steps, seed, 2.0, 8)
        assert t is None and s is None and msg.startswith("**Error:**") and expected in msg, msg
        assert "Traceback" not in msg
    assert "Teacher CFG must be" in demo_mod.generate(teacher, student, 3, "", 2, 0, -1.0, 8)[2]


def test_text_to_image_dirs_need_a_prompt(demo_mod, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval import tiny_sd_pipeline_dir

    sd = tiny_sd_pipeline_dir(tmp_path / "sd")
    t, s, msg = demo_mod.generate(sd, sd, 0, "   ", 1, 0, 1.0, 2)
    assert t is None and "Enter a prompt" in msg
    t, s, msg = demo_mod.generate(sd, sd, 0, "a red cat", 1, 0, 1.0, 2)
    assert t is not None and s is not None and "a red cat" in msg


def test_http_round_trip_with_gradio_client(served, dirs):
    from gradio_client import Client

    teacher, student, runs = dirs
    client = Client(served, verbose=False)
    try:
        t, s, msg = client.predict(str(teacher), str(student), 7, "", 2, 1, 2.0, 6, api_name="/generate")
        for out, role in ((t, "Teacher"), (s, "Student")):
            assert out["label"].startswith(role) and out["label"].endswith(" ms")
            assert image_size(out["value"]) == (SHOWN, SHOWN)
        assert "class 7" in msg and "student: 2 step(s)" in msg
        t, s, msg = client.predict(str(teacher), str(student), 70, "", 2, 1, 2.0, 6, api_name="/generate")
        assert t["value"] is None and s["value"] is None and "Class must be" in msg
        t, s, msg = client.predict(str(teacher), str(runs / "nope"), 7, "", 2, 1, 2.0, 6, api_name="/generate")
        assert "No student model found" in msg
        slider, msg = client.predict(str(runs / "old4"), api_name="/student_info")   # choosing another student
        assert slider["maximum"] == 4 and "4 step(s)" in msg
    finally:
        client.close()


def test_one_step_student_serves_and_generates_one_step(demo_mod, dirs):
    """A one-step student as the start-up student and as a later choice: the page builds (Gradio refuses a
    1..1 slider), the slider is locked at 1, and generation uses 1 step."""
    from gradio_client import Client

    teacher, _, runs = dirs
    one = runs / "one1"
    demo = demo_mod.build_demo(teacher, one, runs_dir=runs)
    props = slider_props(demo)
    assert props["value"] == 1 and props["minimum"] == 1 and props["maximum"] > 1 and props["interactive"] is False
    assert props["maximum"] == demo_mod.steps_slider(1)["maximum"]
    url = serve(demo)
    client = Client(url, verbose=False)
    try:
        t, s, msg = client.predict(str(teacher), str(one), 4, "", 1, 3, 2.0, 6, api_name="/generate")
        assert t["label"].startswith("Teacher · 6 steps ·") and s["label"].startswith("Student · 1 step(s) ·")
        assert image_size(s["value"]) == (SHOWN, SHOWN)
        assert "student: 1 step(s)" in msg and "class 4" in msg
        t, s, msg = client.predict(str(teacher), str(one), 4, "", 2, 3, 2.0, 6, api_name="/generate")
        assert s["value"] is None and "Student steps must be a whole number between 1 and 1" in msg
        slider, msg = client.predict(str(one), api_name="/student_info")     # chosen in the dropdown
        assert (slider["value"], slider["interactive"]) == (1, False) and "1 step(s)" in msg
        slider, msg = client.predict(str(runs / "old4"), api_name="/student_info")   # unlocked again
        assert (slider["maximum"], slider["value"], slider["interactive"]) == (4, 4, True)
    finally:
        client.close()
        demo.close()
        gc.collect()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium "
                    "chromium-driver)")
def test_headless_chromium_session(served, dirs, tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        wait = WebDriverWait(driver, 45)
        driver.get(served)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#class input")))

        def submit(label):
            box.clear()
            box.send_keys(str(label))
            driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def loaded_images(d):
            imgs = d.find_elements(By.CSS_SELECTOR, "#teacher-image img, #student-image img")
            return [i for i in imgs if i.get_attribute("naturalWidth") not in (None, "0")]

        submit(5)
        wait.until(lambda d: len(loaded_images(d)) == 2 and "class 5" in d.find_element(By.ID, "message").text)
        images = loaded_images(driver)
        assert "Teacher · 50 steps ·" in driver.page_source and "Student · 2 step(s) ·" in driver.page_source
        assert len(images) == 2 and all(int(i.get_attribute("naturalWidth")) == SHOWN for i in images)
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))
        assert image_size(shot)[0] > 0
        if os.environ.get("FEWSTEP_SCREENSHOT_DIR"):        # keep a copy to look at
            shutil.copy(shot, Path(os.environ["FEWSTEP_SCREENSHOT_DIR"]) / "demo.png")

        submit(42)
        wait.until(lambda d: "Class must be" in d.find_element(By.ID, "message").text)
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(tmp_path / "demo_error.png"))
        if os.environ.get("FEWSTEP_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "demo_error.png", Path(os.environ["FEWSTEP_SCREENSHOT_DIR"]) / "demo_error.png")

        # choose the one-step student in the dropdown: the slider locks at 1 and the student samples 1 step
        one = str(dirs[2] / "one1")
        choice = driver.find_element(By.CSS_SELECTOR, "#student-dir input")
        choice.click()
        choice.send_keys(Keys.CONTROL, "a")
        choice.send_keys(one, Keys.ENTER)
        wait.until(lambda d: "trained for 1 step(s)" in d.find_element(By.ID, "message").text)
        slider = driver.find_element(By.CSS_SELECTOR, "#steps input[type=range]")
        assert slider.get_attribute("value") == "1" and not slider.is_enabled()
        submit(6)
        wait.until(lambda d: "class 6" in d.find_element(By.ID, "message").text)
        assert "student: 1 step(s)" in driver.find_element(By.ID, "message").text
        assert "Student · 1 step(s) ·" in driver.page_source and "Traceback" not in driver.page_source
    finally:
        driver.quit()
