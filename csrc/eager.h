// The _C module's functions (eager.cpp).
#pragma once

#include <Python.h>

extern PyMethodDef torchmatgrad_eager_methods[];
