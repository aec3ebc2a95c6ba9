#ifndef XTSFS_CARGON2_SHIM_H
#define XTSFS_CARGON2_SHIM_H
#include <argon2.h>
#endif
