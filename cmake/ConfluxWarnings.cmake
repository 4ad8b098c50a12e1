# conflux_warnings(target): the project's warning set, an error when CONFLUX_WERROR is on.
function(conflux_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                                           -Wno-sign-conversion)
  # GCC 12 reports -Wrestrict false positives inside libstdc++'s std::string (GCC PR 105329).
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(${target} PRIVATE -Wno-restrict)
  endif()
  if(CONFLUX_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
