"""
Plain ``pip install -e .`` and ``pip install .`` give a working ``twistd payflux`` and ``payflux``.

Each test installs a copy of the checkout (setup.py, README.md, payflux/, the twisted plugin)
into a fresh venv with ``--no-deps --no-build-isolation`` (nothing downloaded); the venv sees
this test venv's dependencies through a ``.pth`` line naming its site-packages (a path line:
the editable install of the checkout recorded there is not processed).  Then, from an empty
directory: Twisted's plugin scan must find ``payflux`` and both commands must answer ``--help``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_project(dest: str) -> str:
    src = os.path.join(dest, "src")
    os.makedirs(os.path.join(src, "twisted", "plugins"))
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    shutil.copy(os.path.join(ROOT, "twisted", "plugins", "payflux_plugin.py"), os.path.join(src, "twisted", "plugins"))
    shutil.copytree(os.path.join(ROOT, "payflux"), os.path.join(src, "payflux"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


class InstallTests(SynchronousTestCase):
    timeout = 240

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="payflux-install-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.src = _copy_project(self.dir)
        self.venv = os.path.join(self.dir, "venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", self.venv], check=True, timeout=60)
        self.python = os.path.join(self.venv, "bin", "python")
        purelib = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        self.site = purelib
        with open(os.path.join(purelib, "zz-test-deps.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        self.cwd = os.path.join(self.dir, "elsewhere")
        os.mkdir(self.cwd)

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
               and not k.startswith("PAYFLUX_")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def pip_install(self, *args: str) -> str:
        done = subprocess.run([self.python, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation",
                               "--no-index", *args], capture_output=True, text=True, timeout=180,
                              cwd=self.cwd, env=self.env())
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, output)
        self.assertIn("Successfully installed payflux", output)
        return output

    def assertCommandsWork(self):
        twistd = subprocess.run([self.python, "-c", "from twisted.scripts.twistd import run; run()", "payflux",
                                 "--help"], capture_output=True, text=True, timeout=60, cwd=self.cwd, env=self.env())
        self.assertEqual(twistd.returncode, 0, twistd.stdout + twistd.stderr)
        self.assertIn("payflux [options]", twistd.stdout)
        self.assertIn("--log-format", twistd.stdout)
        self.assertNotIn("Unknown command", twistd.stdout + twistd.stderr)
        # the console script pip made, run from its own venv
        payflux = subprocess.run([os.path.join(self.venv, "bin", "payflux"), "--help"], capture_output=True,
                                 text=True, timeout=60, cwd=self.cwd, env=self.env())
        self.assertEqual(payflux.returncode, 0, payflux.stdout + payflux.stderr)
        self.assertIn("serve", payflux.stderr + payflux.stdout)
        serve = subprocess.run([os.path.join(self.venv, "bin", "payflux"), "serve", "--help"], capture_output=True,
                               text=True, timeout=60, cwd=self.cwd, env=self.env())
        self.assertEqual(serve.returncode, 0, serve.stdout + serve.stderr)
        self.assertIn("Usage: payflux serve [options]", serve.stdout)

    def test_editable_install(self):
        output = self.pip_install("-e", self.src)
        self.assertNotIn("deprecat", output.lower())
        self.assertCommandsWork()

    def test_regular_install_ships_the_plugin_and_no_twisted_package_files(self):
        output = self.pip_install(self.src)
        self.assertNotIn("deprecat", output.lower())
        self.assertTrue(os.path.exists(os.path.join(self.site, "twisted", "plugins", "payflux_plugin.py")))
        for owned_by_twisted in ("__init__.py", os.path.join("plugins", "__init__.py")):
            self.assertFalse(os.path.exists(os.path.join(self.site, "twisted", owned_by_twisted)), owned_by_twisted)
        self.assertCommandsWork()
