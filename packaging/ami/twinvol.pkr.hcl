# Packer template: a Debian 12 AMI with twinvol installed and per-instance state cleared.
#   bash packaging/build-deb.sh --output target/debian
#   packer init packaging/ami && packer build -var deb=target/debian/twinvol_0.1.0-1_amd64.deb packaging/ami
# The image enables nothing; see docs/OPERATIONS.md ("Building an AMI").
packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "deb" {
  type        = string
  description = "Path of the twinvol .deb to install"
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

source "amazon-ebs" "twinvol" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "twinvol-{{timestamp}}"
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"] # Debian
    most_recent = true
  }
  tags = {
    Name = "twinvol"
  }
}

build {
  sources = ["source.amazon-ebs.twinvol"]

  provisioner "file" {
    source      = var.deb
    destination = "/tmp/twinvol.deb"
  }

  provisioner "shell" {
    inline = [
      "sudo apt-get update",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y linux-image-cloud-amd64 kmod udev",
    ]
  }

  provisioner "shell" {
    script          = "packaging/ami/bake.sh"
    execute_command = "sudo sh '{{ .Path }}' --deb /tmp/twinvol.deb"
  }
}
