//! Picking the compute device and the float type.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// `--device`: `auto` takes CUDA, then Metal, when easel was built with them and one is
/// present; else the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        let ordinal = |rest: &str| -> Result<usize> {
            if rest.is_empty() {
                return Ok(0);
            }
            rest.strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("invalid device {s:?}; expected auto, cpu, cuda, cuda:N, metal")
                })
        };
        Ok(match s.as_str() {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            _ if s.starts_with("cuda") => Self::Cuda(ordinal(&s[4..])?),
            _ if s.starts_with("metal") => Self::Metal(ordinal(&s[5..])?),
            _ => bail!("invalid device {s:?}; expected auto, cpu, cuda, cuda:N, metal"),
        })
    }
}

/// `--dtype`: `auto` is f16 on a GPU and f32 on the CPU (where candle's f16 is slower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeChoice {
    Auto,
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for DTypeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "f32" | "fp32" | "float32" => Self::F32,
            "f16" | "fp16" | "float16" | "half" => Self::F16,
            "bf16" | "bfloat16" => Self::Bf16,
            other => bail!("invalid dtype {other:?}; expected auto, f32, f16, bf16"),
        })
    }
}

/// Opens the requested device; errors say which cargo feature a build needs.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        DeviceChoice::Cuda(i) => {
            if !candle_core::utils::cuda_is_available() {
                bail!("this easel was built without CUDA support; rebuild with `cargo install --features cuda` (or cudnn)");
            }
            Device::new_cuda(i).map_err(|e| anyhow::anyhow!("cannot open CUDA device {i}: {e}"))
        }
        DeviceChoice::Metal(i) => {
            if !candle_core::utils::metal_is_available() {
                bail!("this easel was built without Metal support; rebuild with `--features metal` on macOS");
            }
            Device::new_metal(i).map_err(|e| anyhow::anyhow!("cannot open Metal device {i}: {e}"))
        }
    }
}

/// Resolves `auto` for the device.
pub fn select_dtype(choice: DTypeChoice, device: &Device) -> Result<DType> {
    Ok(match choice {
        DTypeChoice::Auto if device.is_cpu() => DType::F32,
        DTypeChoice::Auto => DType::F16,
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::F16 => DType::F16,
        DTypeChoice::Bf16 => DType::BF16,
    })
}

/// `f32`, `f16`, `bf16`, as the CLI spells them.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// A short name for messages and metadata, e.g. `cpu`, `cuda:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(
            "cuda:1".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(1)
        );
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn cpu_defaults_to_f32_and_takes_bf16() {
        assert_eq!(
            select_dtype(DTypeChoice::Auto, &Device::Cpu).unwrap(),
            DType::F32
        );
        assert_eq!(
            select_dtype(DTypeChoice::Bf16, &Device::Cpu).unwrap(),
            DType::BF16
        );
    }
}
