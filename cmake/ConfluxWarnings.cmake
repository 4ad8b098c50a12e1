# conflux_warnings(target): the project's warning set, an error when CONFLUX_WERROR is on.
function(conflux_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                                           -Wno-sign-conversion)
  if(CONFLUX_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
