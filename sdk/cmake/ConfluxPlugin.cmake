# conflux_add_plugin(<target> <sources>...)
#
# Builds a Conflux strategy plugin: a MODULE library named <target>.so (no "lib" prefix) that
# links the SDK headers, hides every symbol but the entry point (a linker version script) and
# refuses undefined symbols at link time, so a missing function fails the build, not the load.
# Used by Conflux's own plugins and by third parties through find_package(ConfluxSDK).
set(_CONFLUX_PLUGIN_MAP "${CMAKE_CURRENT_LIST_DIR}/conflux_plugin.map" CACHE INTERNAL "")

function(conflux_add_plugin target)
  add_library(${target} MODULE ${ARGN})
  target_link_libraries(${target} PRIVATE ConfluxSDK::sdk)
  target_compile_features(${target} PRIVATE cxx_std_17)
  # Reproducible float results: no fused multiply-add unless the code asks for one. Results never
  # depend on floating-point exception flags, so the compiler may evaluate both sides of a
  # select (what lets it vectorize `c ? a * b : 0`); values are unchanged.
  target_compile_options(${target} PRIVATE -ffp-contract=off -fno-trapping-math)
  set_target_properties(${target} PROPERTIES
    PREFIX ""
    C_VISIBILITY_PRESET hidden
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    LINK_DEPENDS "${_CONFLUX_PLUGIN_MAP}")
  target_link_options(${target} PRIVATE "LINKER:--version-script=${_CONFLUX_PLUGIN_MAP}" "LINKER:--no-undefined")
endfunction()
