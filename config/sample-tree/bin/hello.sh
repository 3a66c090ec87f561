#!/bin/sh
echo "run from a FUSE mount served by actors"
