import os

from hypothesis import settings

# CI runs the property tests with a fixed seed so a run is repeatable; locally they explore.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
