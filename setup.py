"""Packaging: reads the project's metadata from nbdev's settings.ini."""
from configparser import ConfigParser
from setuptools import find_packages, setup

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]


def requirements(key: str) -> list[str]:
    return cfg.get(key, "").split()


setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    license="Apache-2.0",
    python_requires=f">={cfg['min_python']}",
    packages=find_packages(include=[cfg["lib_name"], f"{cfg['lib_name']}.*"]),
    package_data={cfg["lib_name"]: ["published/*.csv"]},
    install_requires=requirements("requirements"),
    extras_require={
        "dev": requirements("dev_requirements"),
        "pipeline": requirements("pipeline_requirements"),
    },
    entry_points={
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
        # `papermill --engine ipc`: the pipeline's notebooks run with their kernel on Unix sockets (nbs/16b_papermill_engine)
        "papermill.engine": [f"ipc={cfg['lib_path']}.papermill_engine:IPCEngine"],
    },
)
