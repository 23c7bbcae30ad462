// Stand-in for <cuda_fp16.h> under host emulation: cuda_emu.h provides its contents.
#pragma once
#include "../cuda_emu.h"
