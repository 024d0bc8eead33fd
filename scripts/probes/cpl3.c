#define _GNU_SOURCE
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  long iters=argc>1?atol(argv[1]):1000000; int npages=argc>2?atoi(argv[2]):0; int cpl3=getenv("CPL0")?0:1;
  int kvm=open("/dev/kvm",O_RDWR); int vm=ioctl(kvm,KVM_CREATE_VM,0);
  size_t sz=1ul<<30; unsigned char*mem=mmap(0,sz,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  uint64_t *pml4=(uint64_t*)(mem+0x2000),*pdpt=(uint64_t*)(mem+0x3000),*pd=(uint64_t*)(mem+0x4000);
  pml4[0]=0x3000|7; pdpt[0]=0x4000|7; for(int i=0;i<512;i++) pd[i]=(i*0x200000ul)|0x87;
  uint64_t *gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0; gdt[2]=0x00af9b000000ffffull; gdt[3]=0x00cf93000000ffffull;
  gdt[4]=0x00cff3000000ffffull; gdt[5]=0x00affb000000ffffull;
  uint64_t tb=0x7000; gdt[6]=0x0000890000000067ull | ((tb&0xffffff)<<16) | (((tb>>24)&0xff)<<56); gdt[7]=0;
  *(uint64_t*)(mem+0x7000+4)=0x9000;
  unsigned char k[]={ 0x6a,0x23, 0x68,0x00,0x90,0x00,0x00, 0x68,0x02,0x30,0x00,0x00, /* push rflags 0x3002 */
    0x6a,0x2b, 0x68,0x00,0x18,0x00,0x00, 0x48,0xcf };
  memcpy(mem+0x1000,k,sizeof k);
  // user: rcx=iters loop: dec rcx; jnz; then rdi=0x200000, rdx=npages: mov byte[rdi],1; add rdi,4096; dec rdx; jnz ; out 0x10,al; jmp $
  unsigned char u[]={0x48,0xb9,0,0,0,0,0,0,0,0, 0x48,0xff,0xc9, 0x75,0xfb,
    0x48,0xbf,0,0,0x20,0,0,0,0,0, 0x48,0xba,0,0,0,0,0,0,0,0, 0x48,0x85,0xd2, 0x74,0x0f,
    0xc6,0x07,0x01, 0x48,0x81,0xc7,0x00,0x10,0x00,0x00, 0x48,0xff,0xca, 0x75,0xf1,
    0xe6,0x10, 0xeb,0xfe};
  *(uint64_t*)(u+2)=iters; *(uint64_t*)(u+27)=npages;
  memcpy(mem+0x1800,u,sizeof u);
  int uffd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
  struct uffdio_api api={.api=UFFD_API,.features=UFFD_FEATURE_SIGBUS}; ioctl(uffd,UFFDIO_API,&api);
  struct uffdio_register reg={.range={(unsigned long)mem+0x200000,sz-0x200000},.mode=UFFDIO_REGISTER_MODE_MISSING};
  if(getenv("UFFD")&&ioctl(uffd,UFFDIO_REGISTER,&reg)) perror("reg");
  int dirty=getenv("DIRTY")!=0; /* KVM's dirty log on the slot: which pages the guest wrote, per run */
  struct kvm_userspace_memory_region r={.slot=0,.flags=dirty?KVM_MEM_LOG_DIRTY_PAGES:0,.guest_phys_addr=0,.memory_size=sz,.userspace_addr=(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  int vcpu=ioctl(vm,KVM_CREATE_VCPU,0); struct kvm_run*run=mmap(0,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100}; ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp); ioctl(vcpu,KVM_SET_CPUID2,&cp);
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  struct kvm_segment seg={.base=0,.limit=0xffffffff,.selector=0x10,.present=1,.type=11,.dpl=0,.db=0,.s=1,.l=1,.g=1};
  s.cs=seg; seg.type=3; seg.selector=0x18; seg.l=0; seg.db=1; s.ds=s.es=s.fs=s.gs=s.ss=seg;
  struct kvm_segment tr={.base=0x7000,.limit=0x67,.selector=0x30,.present=1,.type=11,.s=0}; s.tr=tr;
  s.gdt.base=0x500; s.gdt.limit=63; s.idt.base=0x6000; s.idt.limit=0xfff;
  s.cr3=0x2000; s.cr4=0x20; s.cr0=0x80000011; s.efer=0x500; if(ioctl(vcpu,KVM_SET_SREGS,&s)) perror("sregs");
  struct kvm_regs rg={0}; rg.rip=cpl3?0x1000:0x1800; rg.rflags=cpl3?2:0x3002; rg.rsp=0x8000; ioctl(vcpu,KVM_SET_REGS,&rg);
  static unsigned char page[4096] __attribute__((aligned(4096)));
  static uint64_t bitmap[(1ul<<30)/4096/64];
  int passes=getenv("PASSES")?atoi(getenv("PASSES")):(dirty?3:1);
  for(int pass=0;pass<passes;pass++){
  if(pass){ ioctl(vcpu,KVM_SET_SREGS,&s); rg.rip=cpl3?0x1000:0x1800; rg.rflags=cpl3?2:0x3002; rg.rsp=0x8000; ioctl(vcpu,KVM_SET_REGS,&rg); }
  double t0=now(); int mmio=0,mf=0,other=0;
  for(;;){
    int ret=ioctl(vcpu,KVM_RUN,0); int e=errno;
    if(ret){ if(e==EFAULT && run->exit_reason==39){ mf++; uint64_t gpa=((uint64_t*)((char*)run+32))[1];
        struct uffdio_copy c={.dst=(unsigned long)mem+(gpa&~0xfffull),.src=(unsigned long)page,.len=4096}; if(ioctl(uffd,UFFDIO_COPY,&c)){perror("copy");break;} continue;}
      printf("ret=%d errno=%d exit=%d\n",ret,e,run->exit_reason); break;}
    if(run->exit_reason==KVM_EXIT_MMIO){ mmio++; if(mmio<3)printf("mmio %llx w=%d\n",run->mmio.phys_addr,run->mmio.is_write);
      struct uffdio_copy c={.dst=(unsigned long)mem+(run->mmio.phys_addr&~0xfffull),.src=(unsigned long)page,.len=4096}; ioctl(uffd,UFFDIO_COPY,&c); continue;}
    if(run->exit_reason==KVM_EXIT_IO){ break; }
    other++; ioctl(vcpu,KVM_GET_REGS,&rg); ioctl(vcpu,KVM_GET_SREGS,&s);
    printf("exit %d rip=%llx cpl=%d\n",run->exit_reason,rg.rip,s.cs.dpl); if(run->exit_reason==KVM_EXIT_INTERNAL_ERROR) printf("suberr %d\n",run->internal.suberror); break;
  }
  double t=now()-t0; struct kvm_sregs s2; ioctl(vcpu,KVM_GET_SREGS,&s2);
  printf("cpl3=%d iters=%ld pages=%d mmio=%d memfault=%d time=%.3fs cs=%x pages/s=%.0f\n",cpl3,iters,npages,mmio,mf,t,s2.cs.selector,npages/t);
  if(dirty){ /* each pass writes the same pages again: the log must see them again */
    struct kvm_dirty_log log={.slot=0,.dirty_bitmap=bitmap}; double g0=now();
    if(ioctl(vm,KVM_GET_DIRTY_LOG,&log)) perror("KVM_GET_DIRTY_LOG");
    double g=now()-g0; long n=0,in=0;
    for(size_t i=0;i<sizeof bitmap/8;i++){ n+=__builtin_popcountll(bitmap[i]); }
    for(int p=0;p<npages;p++){ size_t pg=0x200+p; in+=(bitmap[pg/64]>>(pg%64))&1; }
    printf("pass %d: dirty log %ld pages set, %ld of the %d written, GET_DIRTY_LOG of 1 GiB %.0f us\n",pass,n,in,npages,g*1e6);
  }
  }
}
