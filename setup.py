from setuptools import find_packages, setup

setup(
    name="comet",
    version="0.1.0",
    description="Real-time server push over plain HTTP (SSE, multipart, chunked, long-poll) for CherryPy and WSGI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["comet", "comet.*"]),
    package_data={"comet": ["py.typed", "static/*"]},
    python_requires=">=3.10",
    # cheroot, CherryPy: the range the suite passed on (lowest: .ci/lowest.txt); comet.internals lists why
    install_requires=["cheroot>=8.6,<12", "CherryPy>=18.10,<19", "jinja2>=3.1"],
    extras_require={
        # hiredis: redis-py's C reply parser, ~1.5x the publish rate here
        "redis": ["redis>=5", "hiredis>=2"],
        "docs": ["sphinx>=7", "myst-parser>=2"],
        # playwright drives the system Chromium (Debian's package); it never
        # downloads a browser of its own here. The suite also builds the docs
        # (warnings are errors) and runs their snippets.
        "test": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.100", "redis>=5", "hiredis>=2",
                 "playwright>=1.40", "sphinx>=7", "myst-parser>=2", "mypy>=1.10",
                 # Pillow: the JPEG frames of tests/browser/test_multipart_img.py
                 "pillow>=10"],
    },
    # The fixtures (comet_cherrypy, comet_wsgi) are available to any test suite
    # once comet is installed, like other pytest plugins.
    entry_points={"pytest11": ["comet = comet.testing"]},
    classifiers=[
        "Framework :: CherryPy",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP :: WSGI",
    ],
)
