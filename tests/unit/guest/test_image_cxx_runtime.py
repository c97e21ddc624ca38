"""The image builder unlinks libstdc++ from shared objects that use none of it
(guest/image/build.py drop_unused_cxx_runtime); the decision reads readelf's output."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from guest.image.build import CXX_RUNTIME, cxx_symbols, drop_unused_cxx_runtime, needed_entries

DYN_SYMS = """
Symbol table '.dynsym' contains 5 entries:
   Num:    Value          Size Type    Bind   Vis      Ndx Name
     0: 0000000000000000     0 NOTYPE  LOCAL  DEFAULT  UND
     1: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND memcpy@GLIBC_2.14 (2)
     2: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND PyType_FromSpec
     3: 0000000000001000    10 FUNC    GLOBAL DEFAULT   12 PyInit__message
"""


def test_c_only_imports_need_no_cxx_runtime() -> None:
    assert cxx_symbols(DYN_SYMS) == []


@pytest.mark.parametrize("symbol", [
    "_ZSt9terminatev@GLIBCXX_3.4 (3)",  # mangled, versioned
    "_Znwm",  # operator new, unversioned
    "__cxa_begin_catch@CXXABI_1.3 (4)",
    "__gxx_personality_v0@CXXABI_1.3 (4)",
])
def test_any_cxx_import_keeps_it(symbol: str) -> None:
    line = f"     4: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND {symbol}\n"
    assert cxx_symbols(DYN_SYMS + line) == [symbol.split()[0]]


def test_glibc_s_cxa_functions_are_not_cxx() -> None:
    """__cxa_atexit/__cxa_finalize are glibc's (every C shared object may import them)."""
    line = ("     4: 0000000000000000     0 FUNC    WEAK   DEFAULT  UND "
            "__cxa_finalize@GLIBC_2.2.5 (2)\n")
    assert cxx_symbols(DYN_SYMS + line) == []


def test_a_defined_cxx_symbol_is_not_an_import() -> None:
    line = "     4: 0000000000002000    16 FUNC    GLOBAL DEFAULT   12 _ZN3foo3barEv\n"
    assert cxx_symbols(DYN_SYMS + line) == []


def test_a_c_object_linked_against_libstdcxx_is_unlinked_and_still_loads(tmp_path: Path
                                                                          ) -> None:
    """A real shared object, as upb's is built: C code, libstdc++ on its link line."""
    (tmp_path / "c.c").write_text("int answer(void) { return 42; }\n")
    (tmp_path / "cxx.cc").write_text('#include <string>\nextern "C" int size(void) '
                                     '{ return std::string("abc").size(); }\n')
    lib = tmp_path / "lib"
    lib.mkdir()
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,--no-as-needed", "-o",
                    str(lib / "c_only.so"), str(tmp_path / "c.c"), "-lstdc++"], check=True)
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(lib / "uses_cxx.so"),
                    str(tmp_path / "cxx.cc")], check=True)
    assert CXX_RUNTIME in needed_entries(lib / "c_only.so")
    assert drop_unused_cxx_runtime(tmp_path) == ["lib/c_only.so"]
    assert CXX_RUNTIME not in needed_entries(lib / "c_only.so")
    assert CXX_RUNTIME in needed_entries(lib / "uses_cxx.so")
    import ctypes
    assert ctypes.CDLL(str(lib / "c_only.so")).answer() == 42
