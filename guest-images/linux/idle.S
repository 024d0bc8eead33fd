/*
 * idle: a /init that makes no system call and never exits, so a Linux guest
 * stays up (timers, workqueues, drivers: the balloon and virtio-mem tests
 * need nothing more) on hosts where a guest's user mode cannot make system
 * calls yet. User code runs natively on PVM hosts: the loop costs one host
 * CPU's share of the vCPU, nothing is emulated.
 */
	.globl _start
	.text
_start:
1:	pause
	jmp	1b
