# `cmake --install build [--prefix P]`: the tandem binary, the public headers under
# include/tandem, the libraries, and a CMake package so another project can write
#   find_package(Tandem REQUIRED)
#   target_link_libraries(app PRIVATE Tandem::training)   # or Tandem::runtime, ...
include(CMakePackageConfigHelpers)

set(tandem_libraries tandem_kernels tandem_runtime tandem_parallel tandem_inference
                     tandem_training)
if(TANDEM_HAVE_CUDA)
  list(APPEND tandem_libraries tandem_kernels_cuda)
endif()

install(TARGETS ${tandem_libraries} EXPORT TandemTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS tandem RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
foreach(dir kernels runtime parallel inference training)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${dir}/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/tandem/${dir}
          FILES_MATCHING PATTERN "*.h")
endforeach()

set(tandem_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/Tandem)
install(EXPORT TandemTargets NAMESPACE Tandem:: DESTINATION ${tandem_cmake_dir})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/TandemConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/TandemConfig.cmake
                              INSTALL_DESTINATION ${tandem_cmake_dir})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/TandemConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/TandemConfig.cmake
              ${PROJECT_BINARY_DIR}/TandemConfigVersion.cmake
        DESTINATION ${tandem_cmake_dir})
