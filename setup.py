import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# One version source: comet/__init__.py. Read, not imported: importing comet
# needs CherryPy, which is not installed yet when this runs.
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "comet" / "__init__.py").read_text(encoding="utf-8"), re.M)[1]
URL = "https://github.com/cherrypy-comet/cherrypy-comet"

setup(
    # "comet" on PyPI is someone else's project (a VOEvent broker); the
    # import name stays comet.
    name="cherrypy-comet",
    version=VERSION,
    description="Real-time server push over plain HTTP (SSE, multipart, chunked, long-poll) for CherryPy and WSGI",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="the comet developers",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    url=URL,
    project_urls={
        "Documentation": URL + "/tree/main/docs",
        "Changelog": URL + "/blob/main/CHANGELOG.md",
        "Issues": URL + "/issues",
    },
    packages=find_packages(include=["comet", "comet.*"]),
    py_modules=["comet_pytest"],
    package_data={"comet": ["py.typed", "static/*"]},
    python_requires=">=3.10",
    # cheroot, CherryPy: the range the suite passed on (lowest: .ci/lowest.txt); comet.internals lists why
    install_requires=["cheroot>=8.6,<12", "CherryPy>=18.10,<19"],
    extras_require={
        # hiredis: redis-py's C reply parser, ~1.5x the publish rate here
        "redis": ["redis>=5", "hiredis>=2"],
        "docs": ["sphinx>=7", "myst-parser>=2"],
        # What examples/ (and ./run demo) need beyond comet itself.
        "examples": ["jinja2>=3.1"],
        # playwright drives the system Chromium (Debian's package); it never
        # downloads a browser of its own here. The suite also builds the docs
        # (warnings are errors) and runs their snippets, builds and checks
        # the distributions (build, twine; setuptools and wheel because it
        # builds without isolation, offline), parses /metrics with
        # prometheus_client's parser (comet itself writes the format), and
        # serves the WSGI example under waitress and gunicorn, and the Flask
        # and Django recipes.
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "hypothesis>=6.100", "redis>=5", "hiredis>=2",
                 "playwright>=1.40", "sphinx>=7", "myst-parser>=2", "mypy>=1.10", "jinja2>=3.1",
                 "build>=1", "twine>=5", "setuptools>=61", "wheel>=0.40",
                 "prometheus_client>=0.17", "waitress>=2.1", "gunicorn>=21", "flask>=2.3", "django>=4.2",
                 # Pillow: the JPEG frames of tests/browser/test_multipart_img.py
                 "pillow>=10",
                 # h2 (hyper-h2): tests/test_deploy.py's storm over HTTP/2, as browsers open it
                 "h2>=4"],
    },
    # The fixtures (comet_cherrypy, comet_wsgi, comet_redis) are available to
    # any test suite once comet is installed, like other pytest plugins. The
    # plugin is a module of its own, outside the comet package: importing
    # comet imports CherryPy, and a suite that uses no comet fixture should
    # not pay for that.
    entry_points={"pytest11": ["comet = comet_pytest"]},
    classifiers=[
        "Development Status :: 4 - Beta",
        "Framework :: CherryPy",
        "Framework :: Pytest",
        "Intended Audience :: Developers",
        "License :: OSI Approved :: BSD License",
        "Operating System :: POSIX",
        "Programming Language :: JavaScript",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Internet :: WWW/HTTP :: Dynamic Content",
        "Topic :: Internet :: WWW/HTTP :: WSGI",
        "Typing :: Typed",
    ],
)
