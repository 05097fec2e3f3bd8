// check.hpp: the checking the C++ test programs share. CHECK(cond, what) counts one check and,
// when `cond` is false, prints the program's name, file:line, `what` (a std::string) and tessera's
// last error, then exits 1. The including file defines `kProgram` (its name) before including
// this header, inside an anonymous namespace.
#ifndef TESSERA_TESTS_CHECK_HPP
#define TESSERA_TESTS_CHECK_HPP

#include <cstdio>
#include <cstdlib>
#include <string>

#include "tessera.h"

namespace {

int checks = 0;

[[noreturn]] void fail(const char *file, int line, const std::string &what) {
  std::fflush(stdout);
  std::fprintf(stderr,
               "%s: FAIL at %s:%d\n  %s\n  tessera_last_error_code() = %d, "
               "tessera_last_error() = \"%s\"\n",
               kProgram, file, line, what.c_str(), tessera_last_error_code(),
               tessera_last_error());
  std::exit(1);
}

}  // namespace

#define CHECK(cond, what)                              \
  do {                                                 \
    ++checks;                                          \
    if (!(cond)) fail(__FILE__, __LINE__, (what));     \
  } while (0)

#endif
