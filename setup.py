"""Placeholder build: replaced by the CMake-driven extension build."""

from setuptools import setup

setup()
