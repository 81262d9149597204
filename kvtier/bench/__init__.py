"""kvtier benchmark suites (``kvtier bench <suite>``); each measures its own peak in the same run."""
