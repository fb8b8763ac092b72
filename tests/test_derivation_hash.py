"""hashDerivationModulo, realisation ids, resolution, and the store reader, against known
answers recorded from Nix 2.8.0 (ca-derivations on) building a small graph in a throwaway
store: fixed outputs (flat sha256, recursive sha256, flat sha1), input-addressed derivations
(two outputs, an env value with escapes, UTF-8 and raw bytes), structured attributes, floating
CA derivations (two outputs), and an input-addressed derivation on CA inputs (deferred)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from tracehook.errors import EnvironmentFault, ParseError, UnresolvedInput
from tracehook.nix.aterm import aterm_parts, parse
from tracehook.nix.derivation import Derivation, DerivationOutput, decode_drv, encode_drv, serialize
from tracehook.nix.derivation_hash import (
    DrvHash,
    hash_derivation_modulo,
    input_addressed_paths,
    realisation_id,
    realisation_ids,
)
from tracehook.nix.realisation import build_trace_id
from tracehook.nix.resolve import resolve, resolved_key, resolved_path
from tracehook.nix.storepath import basename, derivation_path, hash_part
from tracehook.stores.nixstore import StoreReader

# fmt: off
# Every .drv in the Nix 2.8 store after `nix-build -A top` (+ `sa`, instantiated only).
NIX_DRVS: dict[str, str] = {
    '/nix/store/4b1iwlzz1l4lm9lbdagxqpibkhv324zq-ca2.drv': (
        'Derive([("lib","","r:sha256",""),("out","","r:sha256","")],[("/nix/store/hc7'
        'lcv5mf4nr1ldnhr6wxlyd6zzzjbp0-ca1.drv",["out"])],["/nix/store/9nr5xh37wy1gx5'
        'sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5'
        'svcw4lj-bb/busybox",["sh","-c","echo /19qh6nxxnhij9kjbqsm9ppc749xipafh3k4kx3'
        '9k7d7v1h6ldr15 > $out; echo lib /19qh6nxxnhij9kjbqsm9ppc749xipafh3k4kx39k7d7'
        'v1h6ldr15 > $lib"],[("builder","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-'
        'bb/busybox"),("lib","/0sra2y18lr3h6j58qjm0w46yv36h1wjmilb09n8aimdpivdymscx")'
        ',("name","ca2"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n'
        '9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("outputs","o'
        'ut lib"),("system","x86_64-linux")])'
    ),
    '/nix/store/5mxq9irimafzv4asrlkwl4mazwjfhxif-sa.drv': (
        'Derive([("doc","/nix/store/fnl33j8d5r4c851pw5d463bizjfirck8-sa-doc","",""),('
        '"out","/nix/store/ps8gn94zrv4a6gyxsxvf35icn12imw52-sa","","")],[("/nix/store'
        '/gz4qrn4wgf9mb1zk6v7f2aam1wq6cy1k-ia2.drv",["out"])],["/nix/store/9nr5xh37wy'
        '1gx5sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj'
        '9if5svcw4lj-bb/busybox",["sh","-c","echo /nix/store/54wgkmzpyh1ggybp1sdyzjlm'
        'ffgcnkpf-ia2"],[("__json","{\\"builder\\":\\"/nix/store/9nr5xh37wy1gx5sv9j1cj9i'
        'f5svcw4lj-bb/busybox\\",\\"list\\":[1,\\"two\\"],\\"name\\":\\"sa\\",\\"outputs\\":[\\"o'
        'ut\\",\\"doc\\"],\\"system\\":\\"x86_64-linux\\"}"),("doc","/nix/store/fnl33j8d5r4c'
        '851pw5d463bizjfirck8-sa-doc"),("out","/nix/store/ps8gn94zrv4a6gyxsxvf35icn12'
        'imw52-sa")])'
    ),
    '/nix/store/6sxrn8av3jh6j0v20bml3nkf01nk3hh4-top.drv': (
        'Derive([("out","","r:sha256","")],[("/nix/store/4b1iwlzz1l4lm9lbdagxqpibkhv3'
        '24zq-ca2.drv",["out"]),("/nix/store/iazhwq15nz209yz46w2fwqymslwj1l1f-ia1.drv'
        '",["dev"]),("/nix/store/vz99nvw96p3a6kr1ix07b4k0pjgrcl4v-ia-on-ca.drv",["out'
        '"])],["/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/nix'
        '/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh","-c","echo /1aia6l'
        'kn8yjgriy8wxcsccii6g09xvfd7f095amx1caphh13yvkf /1cm5d5wkgc26zvphrlv2i8wa0i4w'
        '8j40wdpnfkvl73ssjj0l60jj /nix/store/by8dy9kf2pncd3yw5y7gbglixn68l0rv-ia1-dev'
        ' > $out"],[("builder","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybo'
        'x"),("name","top"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8k'
        'f2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system",'
        '"x86_64-linux")])'
    ),
    '/nix/store/80w10gzlimbk01025sd3yfa430ywb43b-ia-on-ca.drv': (
        'Derive([("out","/nix/store/3g4mdmsvc792m5ah9zfjh2clwghidri1-ia-on-ca","","")'
        '],[],["/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb","/nix/store/gzij78s1g'
        'rbg6pjv95hvgzd92ksl52wn-fod-rec","/nix/store/jwahhy37absqkcw03br41spssa7aam5'
        'c-ca2-lib"],"x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/b'
        'usybox",["sh","-c","echo /nix/store/jwahhy37absqkcw03br41spssa7aam5c-ca2-lib'
        ' /nix/store/gzij78s1grbg6pjv95hvgzd92ksl52wn-fod-rec > $out"],[("builder","/'
        'nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("name","ia-on-ca"),'
        '("out","/nix/store/3g4mdmsvc792m5ah9zfjh2clwghidri1-ia-on-ca"),("system","x8'
        '6_64-linux")])'
    ),
    '/nix/store/8z23cc8ff7i77zpqzlfr2h97y3l39m5y-fod-rec.drv': (
        'Derive([("out","/nix/store/gzij78s1grbg6pjv95hvgzd92ksl52wn-fod-rec","r:sha2'
        '56","0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405171e969")],[],'
        '["/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/nix/stor'
        'e/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh","-c","printf hello > $o'
        'ut"],[("builder","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),('
        '"name","fod-rec"),("out","/nix/store/gzij78s1grbg6pjv95hvgzd92ksl52wn-fod-re'
        'c"),("outputHash","0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405'
        '171e969"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("syste'
        'm","x86_64-linux")])'
    ),
    '/nix/store/9jr9j707ihlxnwq4g0csc1ngfx4np0lq-ca1.drv': (
        'Derive([("out","","r:sha256","")],[],["/nix/store/54wgkmzpyh1ggybp1sdyzjlmff'
        'gcnkpf-ia2","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"x86_64-linux"'
        ',"/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh","-c","echo /'
        'nix/store/54wgkmzpyh1ggybp1sdyzjlmffgcnkpf-ia2 > $out"],[("builder","/nix/st'
        'ore/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("name","ca1"),("out","/1r'
        'z4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha2'
        '56"),("outputHashMode","recursive"),("system","x86_64-linux")])'
    ),
    '/nix/store/fklffm4hjd4ml0i9pi5h25pv5xkgwsvq-fod-flat.drv': (
        'Derive([("out","/nix/store/6dlq85ipg078m6vw6pc6w1pfylqpyp4s-fod-flat","sha25'
        '6","2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")],[],['
        '"/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/nix/store'
        '/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh","-c","printf hello > $ou'
        't"],[("builder","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("'
        'name","fod-flat"),("out","/nix/store/6dlq85ipg078m6vw6pc6w1pfylqpyp4s-fod-fl'
        'at"),("outputHash","2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362'
        '938b9824"),("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","'
        'x86_64-linux")])'
    ),
    '/nix/store/gz4qrn4wgf9mb1zk6v7f2aam1wq6cy1k-ia2.drv': (
        'Derive([("out","/nix/store/54wgkmzpyh1ggybp1sdyzjlmffgcnkpf-ia2","","")],[("'
        '/nix/store/iazhwq15nz209yz46w2fwqymslwj1l1f-ia1.drv",["dev","out"])],["/nix/'
        'store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/nix/store/9nr5x'
        'h37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh","-c","echo /nix/store/by8dy9kf'
        '2pncd3yw5y7gbglixn68l0rv-ia1-dev /nix/store/smy3vhp713mgppiximmw27yf0rkm217m'
        '-ia1 > $out"],[("builder","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/bu'
        'sybox"),("name","ia2"),("out","/nix/store/54wgkmzpyh1ggybp1sdyzjlmffgcnkpf-i'
        'a2"),("system","x86_64-linux")])'
    ),
    '/nix/store/hc7lcv5mf4nr1ldnhr6wxlyd6zzzjbp0-ca1.drv': (
        'Derive([("out","","r:sha256","")],[("/nix/store/gz4qrn4wgf9mb1zk6v7f2aam1wq6'
        'cy1k-ia2.drv",["out"])],["/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"'
        'x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh"'
        ',"-c","echo /nix/store/54wgkmzpyh1ggybp1sdyzjlmffgcnkpf-ia2 > $out"],[("buil'
        'der","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("name","ca1"'
        '),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHa'
        'shAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])'
    ),
    '/nix/store/hyc7zwli8m04pxj9xzi8fwm4818k0wr4-fod-sha1.drv': (
        'Derive([("out","/nix/store/0wdkj79yj2s0cvzvnqvwzsdxc5hdxn0b-fod-sha1","sha1"'
        ',"aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d")],[],["/nix/store/9nr5xh37wy1gx5'
        'sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5'
        'svcw4lj-bb/busybox",["sh","-c","printf hello > $out"],[("builder","/nix/stor'
        'e/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("name","fod-sha1"),("out","'
        '/nix/store/0wdkj79yj2s0cvzvnqvwzsdxc5hdxn0b-fod-sha1"),("outputHash","aaf4c6'
        '1ddcc5e8a2dabede0f3b482cd9aea9434d"),("outputHashAlgo","sha1"),("outputHashM'
        'ode","flat"),("system","x86_64-linux")])'
    ),
    '/nix/store/iazhwq15nz209yz46w2fwqymslwj1l1f-ia1.drv': (
        'Derive([("dev","/nix/store/by8dy9kf2pncd3yw5y7gbglixn68l0rv-ia1-dev","",""),'
        '("out","/nix/store/smy3vhp713mgppiximmw27yf0rkm217m-ia1","","")],[("/nix/sto'
        're/8z23cc8ff7i77zpqzlfr2h97y3l39m5y-fod-rec.drv",["out"]),("/nix/store/fklff'
        'm4hjd4ml0i9pi5h25pv5xkgwsvq-fod-flat.drv",["out"]),("/nix/store/hyc7zwli8m04'
        'pxj9xzi8fwm4818k0wr4-fod-sha1.drv",["out"])],["/nix/store/9nr5xh37wy1gx5sv9j'
        '1cj9if5svcw4lj-bb"],"x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw'
        '4lj-bb/busybox",["sh","-c","echo /nix/store/6dlq85ipg078m6vw6pc6w1pfylqpyp4s'
        '-fod-flat /nix/store/gzij78s1grbg6pjv95hvgzd92ksl52wn-fod-rec /nix/store/0wd'
        'kj79yj2s0cvzvnqvwzsdxc5hdxn0b-fod-sha1 > $out; echo dev > $dev"],[("builder"'
        ',"/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("dev","/nix/stor'
        'e/by8dy9kf2pncd3yw5y7gbglixn68l0rv-ia1-dev"),("name","ia1"),("out","/nix/sto'
        're/smy3vhp713mgppiximmw27yf0rkm217m-ia1"),("outputs","out dev"),("system","x'
        '86_64-linux"),("weird","quote\\" backslash\\\\ nl\\n tab\\t cr\\r umlaut ü euro € '
        'raw \udcff\udcfe ")])'
    ),
    '/nix/store/jx80hjfrdkv4702j2l3hdq1xmh507l77-ca2.drv': (
        'Derive([("lib","","r:sha256",""),("out","","r:sha256","")],[],["/nix/store/9'
        'nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb","/nix/store/g7cyznv7xmjsmrypkjwhp3sm1ws2'
        'qaxa-ca1"],"x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/bu'
        'sybox",["sh","-c","echo /nix/store/g7cyznv7xmjsmrypkjwhp3sm1ws2qaxa-ca1 > $o'
        'ut; echo lib /nix/store/g7cyznv7xmjsmrypkjwhp3sm1ws2qaxa-ca1 > $lib"],[("bui'
        'lder","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("lib","/0sr'
        'a2y18lr3h6j58qjm0w46yv36h1wjmilb09n8aimdpivdymscx"),("name","ca2"),("out","/'
        '1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sh'
        'a256"),("outputHashMode","recursive"),("outputs","out lib"),("system","x86_6'
        '4-linux")])'
    ),
    '/nix/store/qkpmdw69grrb5jfg681y453i3nxz7pjm-top.drv': (
        'Derive([("out","","r:sha256","")],[],["/nix/store/3g4mdmsvc792m5ah9zfjh2clwg'
        'hidri1-ia-on-ca","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb","/nix/stor'
        'e/bj6qfmj5b32mb607yjnriny61rljnwkm-ca2","/nix/store/by8dy9kf2pncd3yw5y7gbgli'
        'xn68l0rv-ia1-dev"],"x86_64-linux","/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4'
        'lj-bb/busybox",["sh","-c","echo /nix/store/3g4mdmsvc792m5ah9zfjh2clwghidri1-'
        'ia-on-ca /nix/store/bj6qfmj5b32mb607yjnriny61rljnwkm-ca2 /nix/store/by8dy9kf'
        '2pncd3yw5y7gbglixn68l0rv-ia1-dev > $out"],[("builder","/nix/store/9nr5xh37wy'
        '1gx5sv9j1cj9if5svcw4lj-bb/busybox"),("name","top"),("out","/1rz4g4znpzjwh1xy'
        'mhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputH'
        'ashMode","recursive"),("system","x86_64-linux")])'
    ),
    '/nix/store/vz99nvw96p3a6kr1ix07b4k0pjgrcl4v-ia-on-ca.drv': (
        'Derive([("out","","","")],[("/nix/store/4b1iwlzz1l4lm9lbdagxqpibkhv324zq-ca2'
        '.drv",["lib"]),("/nix/store/8z23cc8ff7i77zpqzlfr2h97y3l39m5y-fod-rec.drv",["'
        'out"])],["/nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb"],"x86_64-linux","/'
        'nix/store/9nr5xh37wy1gx5sv9j1cj9if5svcw4lj-bb/busybox",["sh","-c","echo /0n2'
        'nxcqs7p5ss09fq7h3svxaisj7gb6c13ca48rryq1yf01vz2hn /nix/store/gzij78s1grbg6pj'
        'v95hvgzd92ksl52wn-fod-rec > $out"],[("builder","/nix/store/9nr5xh37wy1gx5sv9'
        'j1cj9if5svcw4lj-bb/busybox"),("name","ia-on-ca"),("out",""),("system","x86_6'
        '4-linux")])'
    ),
}
NIX_REALISATIONS: dict[str, str] = {
    'sha256:108856b93444b49ad5e3293836a74133f271f767d0123e2f421166285dfcd6e2!out': (
        '/nix/store/54wgkmzpyh1ggybp1sdyzjlmffgcnkpf-ia2'
    ),
    'sha256:28b8fc44de7150483847cc8423f6fe0f75d66953afe2114db5ceea8d5fee2953!lib': (
        '/nix/store/jwahhy37absqkcw03br41spssa7aam5c-ca2-lib'
    ),
    'sha256:28b8fc44de7150483847cc8423f6fe0f75d66953afe2114db5ceea8d5fee2953!out': (
        '/nix/store/bj6qfmj5b32mb607yjnriny61rljnwkm-ca2'
    ),
    'sha256:3121e88db90cbf45f43741ca5ffdcf95795f9911e196817335aeba3ec6e7a17b!out': (
        '/nix/store/gzij78s1grbg6pjv95hvgzd92ksl52wn-fod-rec'
    ),
    'sha256:3926711ceca958da779cac0602a21b6b54deaaeffc6921d149e424cf70e85df0!out': (
        '/nix/store/g7cyznv7xmjsmrypkjwhp3sm1ws2qaxa-ca1'
    ),
    'sha256:5c6e3810564a33b29fa9601577a9dd565eeb4f9c1b1a21d88ff1cb0d5e6c78ab!out': (
        '/nix/store/3g4mdmsvc792m5ah9zfjh2clwghidri1-ia-on-ca'
    ),
    'sha256:77e0fd04212f7c95b59652af9858ca1a4ec95e651a9d11814fbee74bedae2ebd!out': (
        '/nix/store/3g4mdmsvc792m5ah9zfjh2clwghidri1-ia-on-ca'
    ),
    'sha256:93df9a8d0bdba0062426591a233498727ba5405faca0260ffc6dc61de8eadb31!out': (
        '/nix/store/4xa47lxnpr781vd7s337ncndwx3w47dx-top'
    ),
    'sha256:a897ee4e694ff32fd6188b3b28499f5a2674caf19d0d5e5c7a604733585a4ba7!out': (
        '/nix/store/0wdkj79yj2s0cvzvnqvwzsdxc5hdxn0b-fod-sha1'
    ),
    'sha256:b524f5b8f1f78307b3fe0a4d0d053d409415162f86855232cb120ad4d856d75e!dev': (
        '/nix/store/by8dy9kf2pncd3yw5y7gbglixn68l0rv-ia1-dev'
    ),
    'sha256:b524f5b8f1f78307b3fe0a4d0d053d409415162f86855232cb120ad4d856d75e!out': (
        '/nix/store/smy3vhp713mgppiximmw27yf0rkm217m-ia1'
    ),
    'sha256:cc3222a7e7913b59b0e3230ce85721a48b7accb4ec541a3910bbbcc9ce514e58!out': (
        '/nix/store/6dlq85ipg078m6vw6pc6w1pfylqpyp4s-fod-flat'
    ),
    'sha256:d871358c57db02be70c8888fd715a02f61415e420e42161e4d2c4927c134a45d!out': (
        '/nix/store/g7cyznv7xmjsmrypkjwhp3sm1ws2qaxa-ca1'
    ),
    'sha256:e64534ad25a4661177b29cb7e635403f99d0e08e847a509d4ba3d9ba6f03b90c!out': (
        '/nix/store/4xa47lxnpr781vd7s337ncndwx3w47dx-top'
    ),
    'sha256:efbc7ce3782527760ca964ff40709f6b130ba36a3b2ad4c72762e5c877ec7ad7!lib': (
        '/nix/store/jwahhy37absqkcw03br41spssa7aam5c-ca2-lib'
    ),
    'sha256:efbc7ce3782527760ca964ff40709f6b130ba36a3b2ad4c72762e5c877ec7ad7!out': (
        '/nix/store/bj6qfmj5b32mb607yjnriny61rljnwkm-ca2'
    ),
}
# fmt: on

# "resolved derivation: A -> B" lines of that build.
_S = "/nix/store/"
NIX_RESOLVED = {
    _S + "hc7lcv5mf4nr1ldnhr6wxlyd6zzzjbp0-ca1.drv": _S
    + "9jr9j707ihlxnwq4g0csc1ngfx4np0lq-ca1.drv",
    _S + "4b1iwlzz1l4lm9lbdagxqpibkhv324zq-ca2.drv": _S
    + "jx80hjfrdkv4702j2l3hdq1xmh507l77-ca2.drv",
    _S + "vz99nvw96p3a6kr1ix07b4k0pjgrcl4v-ia-on-ca.drv": (
        _S + "80w10gzlimbk01025sd3yfa430ywb43b-ia-on-ca.drv"
    ),
    _S + "6sxrn8av3jh6j0v20bml3nkf01nk3hh4-top.drv": _S
    + "qkpmdw69grrb5jfg681y453i3nxz7pjm-top.drv",
}
SA = "/nix/store/5mxq9irimafzv4asrlkwl4mazwjfhxif-sa.drv"
IA1 = "/nix/store/iazhwq15nz209yz46w2fwqymslwj1l1f-ia1.drv"
FOD_REC = "/nix/store/8z23cc8ff7i77zpqzlfr2h97y3l39m5y-fod-rec.drv"
DEFERRED = "/nix/store/vz99nvw96p3a6kr1ix07b4k0pjgrcl4v-ia-on-ca.drv"
TOP = "/nix/store/6sxrn8av3jh6j0v20bml3nkf01nk3hh4-top.drv"
P = "/nix/store/00000000000000000000000000000000"


@pytest.fixture(scope="module")
def drvs() -> dict[str, Derivation]:
    return {path: parse(text, what=path) for path, text in NIX_DRVS.items()}


@pytest.mark.parametrize("path", sorted(NIX_DRVS))
def test_nix_drvs_round_trip_and_hash_to_their_paths(path: str) -> None:
    data = encode_drv(NIX_DRVS[path])
    drv = parse(decode_drv(data))
    assert encode_drv(serialize(drv)) == data
    assert derivation_path(drv) == path


def test_realisation_ids_match_nix(drvs: dict[str, Derivation]) -> None:
    cache: dict[str, DrvHash] = {}
    computed: dict[str, str] = {}
    for path, drv in drvs.items():
        if path == SA:
            continue  # instantiated, never built: Nix recorded no realisations
        for output, rid in realisation_ids(drv, drvs.__getitem__, cache).items():
            computed[rid] = path
            assert rid.endswith("!" + output)
    assert set(computed) == set(NIX_REALISATIONS)


def test_realisation_ids_with_a_path_keep_its_unmasked_hash(
        drvs: dict[str, Derivation]) -> None:
    """Given the derivation's own path, realisation_ids computes its masked and unmasked
    hashes together (one serialization of what they share) and keeps the unmasked one:
    the ids are Nix's, and the kept hash is hashDerivationModulo's without masking."""
    cache: dict[str, DrvHash] = {}
    computed: dict[str, str] = {}
    for path, drv in drvs.items():
        ids = realisation_ids(drv, drvs.__getitem__, cache, path=path)
        assert ids == realisation_ids(drv, drvs.__getitem__)
        assert cache[path] == hash_derivation_modulo(drv, drvs.__getitem__)
        if path != SA:
            computed.update({rid: path for rid in ids.values()})
    assert set(computed) == set(NIX_REALISATIONS)


@pytest.mark.parametrize(
    "path",
    [IA1, SA, "/nix/store/gz4qrn4wgf9mb1zk6v7f2aam1wq6cy1k-ia2.drv", NIX_RESOLVED[DEFERRED]],
)
def test_input_addressed_paths_match_nix(drvs: dict[str, Derivation], path: str) -> None:
    drv = drvs[path]
    expected = {name: out.path for name, out in drv.outputs.items()}
    assert input_addressed_paths(drv, drvs.__getitem__) == expected


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        (FOD_REC, "regular"),
        (IA1, "regular"),
        ("/nix/store/hc7lcv5mf4nr1ldnhr6wxlyd6zzzjbp0-ca1.drv", "deferred"),
        (DEFERRED, "deferred"),  # input-addressed, but on CA inputs
        (NIX_RESOLVED[DEFERRED], "regular"),
        (TOP, "deferred"),
    ],
)
def test_hash_kinds(drvs: dict[str, Derivation], path: str, kind: str) -> None:
    assert hash_derivation_modulo(drvs[path], drvs.__getitem__).kind == kind


def test_fixed_output_hash_formula(drvs: dict[str, Derivation]) -> None:
    drv = drvs[FOD_REC]
    out = drv.outputs["out"]
    clear = f"fixed:out:r:sha256:{out.hash}:{out.path}"
    expected = hashlib.sha256(clear.encode()).digest()
    assert hash_derivation_modulo(drv).hashes == {"out": expected}
    # masking does not change a fixed output's hash
    assert hash_derivation_modulo(drv, mask_outputs=True).hashes == {"out": expected}


def _outputs_by_realisation(drvs: dict[str, Derivation]) -> dict[tuple[str, str], str]:
    cache: dict[str, DrvHash] = {}
    chosen = {}
    for path, drv in drvs.items():
        if path == SA:
            continue
        for output, rid in realisation_ids(drv, drvs.__getitem__, cache).items():
            chosen[(path, output)] = NIX_REALISATIONS[rid]
    return chosen


@pytest.mark.parametrize("path", sorted(NIX_RESOLVED))
def test_resolve_matches_nix(drvs: dict[str, Derivation], path: str) -> None:
    chosen = _outputs_by_realisation(drvs)
    resolved = resolve(drvs[path], chosen)
    expected = NIX_RESOLVED[path]
    assert serialize(resolved) == NIX_DRVS[expected]
    assert resolved_path(drvs[path], chosen) == expected
    assert resolved_key(drvs[path], chosen) == hash_part(expected)


def test_resolving_a_deferred_derivation_fixes_its_output_path(
    drvs: dict[str, Derivation],
) -> None:
    resolved = resolve(drvs[DEFERRED], _outputs_by_realisation(drvs))
    out = resolved.outputs["out"]
    assert out.kind == "input-addressed"
    assert resolved.env["out"] == out.path
    assert drvs[DEFERRED].outputs["out"].is_deferred


def test_resolve_errors(drvs: dict[str, Derivation]) -> None:
    chosen = _outputs_by_realisation(drvs)
    missing = dict(chosen)
    del missing[(IA1, "dev")]
    with pytest.raises(UnresolvedInput) as info:
        resolve(drvs[TOP], missing)
    assert info.value.drv_path == IA1
    assert info.value.output == "dev"
    assert "dev" in info.value.diagnostics()
    bad = dict(chosen)
    bad[(IA1, "dev")] = "/tmp/evil"
    with pytest.raises(ParseError):
        resolve(drvs[TOP], bad)


def test_resolve_rewrites_env_keys_args_and_builder() -> None:
    dep = f"{P}-dep.drv"
    from tracehook.nix.storepath import upstream_placeholder

    ph = upstream_placeholder(dep, "out")
    chosen_path = "/nix/store/11111111111111111111111111111111-dep"
    drv = Derivation(
        outputs={"out": DerivationOutput("", "r:sha256", "")},
        input_drvs={dep: ("out",)},
        input_srcs=(f"{P}-src",),
        platform="x86_64-linux",
        builder=ph + "/bin/sh",
        args=("-c", f"echo {ph} {ph}"),
        env={"b": "x", ph: "key is a placeholder", "a": ph + ph},
    )
    resolved = resolve(drv, {(dep, "out"): chosen_path})
    assert resolved.input_drvs == {}
    assert resolved.input_srcs == (f"{P}-src", chosen_path)
    assert resolved.builder == chosen_path + "/bin/sh"
    assert resolved.args == ("-c", f"echo {chosen_path} {chosen_path}")
    assert resolved.env == {chosen_path: "key is a placeholder", "a": chosen_path * 2, "b": "x"}
    assert list(resolved.env) == sorted(resolved.env)


def test_inputs_with_the_same_hash_merge() -> None:
    """Two fixed-output derivations with the same output are interchangeable inputs."""
    fod_a = parse(NIX_DRVS[FOD_REC])
    fod_b = dataclasses.replace(fod_a, args=("sh", "-c", "different builder"))
    path_a, path_b = derivation_path(fod_a), derivation_path(fod_b)
    assert path_a != path_b
    loads = {path_a: fod_a, path_b: fod_b}

    def user(inputs: dict[str, tuple[str, ...]]) -> Derivation:
        return Derivation(
            outputs={"out": DerivationOutput("", "r:sha256", "")},
            input_drvs=inputs,
            input_srcs=(),
            platform="x86_64-linux",
            builder="/bin/sh",
            args=(),
            env={"name": "user"},
        )

    one = hash_derivation_modulo(user({path_a: ("out",)}), loads.__getitem__)
    both = hash_derivation_modulo(user({path_a: ("out",), path_b: ("out",)}), loads.__getitem__)
    other = hash_derivation_modulo(user({path_b: ("out",)}), loads.__getitem__)
    assert one == both == other


def _chain(n: int) -> tuple[dict[str, Derivation], str]:
    graph: dict[str, Derivation] = {}
    previous: str | None = None
    for i in range(n):
        path = f"/nix/store/{i:032d}-n{i}.drv"
        graph[path] = Derivation(
            outputs={"out": DerivationOutput(f"/nix/store/{i:032d}-n{i}", "", "")},
            input_drvs={previous: ("out",)} if previous else {},
            input_srcs=(),
            platform="x86_64-linux",
            builder="/bin/sh",
            args=(),
            env={"name": f"n{i}"},
        )
        previous = path
    assert previous is not None
    return graph, previous


def _tricky(outputs: dict[str, DerivationOutput], env: dict[str, str],
            args: tuple[str, ...]) -> Derivation:
    return Derivation(outputs=outputs, input_drvs={FOD_REC: ("out",), IA1: ("dev", "out")},
                      input_srcs=(f"{P}-src",), platform="x86_64-linux", builder="/bin/sh",
                      args=args, env=dict(sorted(env.items())))


_PAIR_LOOKALIKE = '("out","/nix/store/x")'  # an env entry as text, inside a string


@pytest.mark.parametrize("drv", [
    # input-addressed, two outputs; strings that hold what an env entry looks like
    _tricky({"dev": DerivationOutput(f"{P}-t-dev", "", ""),
             "out": DerivationOutput(f"{P}-t", "", "")},
            {"a": _PAIR_LOOKALIKE, "dev": f"{P}-t-dev", "name": "t", "out": f"{P}-t",
             "out2": "not an output", "z": 'quote " backslash \\ tab\t é \udcff'},
            ("-c", _PAIR_LOOKALIKE, '("dev",')),
    # an output with no env var of its name, one whose value is escaped
    _tricky({"dev": DerivationOutput(f"{P}-t-dev", "", ""),
             "out": DerivationOutput(f"{P}-t", "", "")},
            {"name": "t", "out": 'odd "value"\n'}, ()),
    # floating content-addressed: nothing to blank but the env
    _tricky({"out": DerivationOutput("", "r:sha256", "")},
            {"name": "t", "out": "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"},
            ("(\"out\",",)),
], ids=["lookalikes", "escaped", "floating"])
def test_hashing_by_substitution_in_the_read_text_matches_writing_anew(
        drvs: dict[str, Derivation], drv: Derivation) -> None:
    """A derivation read from its .drv text is hashed by substitution in that text
    (realisation_ids given its path): the same hashes as writing the modulo ATerm anew,
    whatever its strings hold; one read from text Nix would not write (an escape it does
    not use) is written anew."""
    loads = {**drvs, derivation_path(drv): drv}
    for text in (serialize(drv), serialize(drv).replace('"/bin/sh"', '"\\/bin/sh"')):
        read = parse(text)
        fast = aterm_parts(read, read_only=True) is not None
        assert fast == (text == serialize(drv))  # (the second one has a needless escape)
        anew = dataclasses.replace(read)  # the same, not read from a text: written anew
        assert aterm_parts(anew, read_only=True) is None
        cache: dict[str, DrvHash] = {}
        path = derivation_path(read)
        ids = realisation_ids(read, loads.__getitem__, cache, path=path)
        assert ids == realisation_ids(anew, loads.__getitem__)
        assert cache[path] == hash_derivation_modulo(anew, loads.__getitem__)
        assert (hash_derivation_modulo(read, loads.__getitem__, mask_outputs=True)
                == hash_derivation_modulo(anew, loads.__getitem__, mask_outputs=True))


def test_deep_graph_does_not_recurse() -> None:
    graph, top = _chain(10_000)
    cache: dict[str, DrvHash] = {}
    result = hash_derivation_modulo(graph[top], graph.__getitem__, cache=cache)
    assert result.kind == "regular"
    assert len(cache) == 9_999


def test_cache_is_reused() -> None:
    graph, top = _chain(50)
    calls: list[str] = []

    def load(path: str) -> Derivation:
        calls.append(path)
        return graph[path]

    cache: dict[str, DrvHash] = {}
    first = hash_derivation_modulo(graph[top], load, cache=cache)
    assert len(calls) == 49
    assert hash_derivation_modulo(graph[top], load, cache=cache) == first
    assert len(calls) == 49


def test_cycle_is_named() -> None:
    a, b = f"{P}-a.drv", "/nix/store/11111111111111111111111111111111-b.drv"

    def node(dep: str) -> Derivation:
        return Derivation(
            outputs={"out": DerivationOutput("", "r:sha256", "")},
            input_drvs={dep: ("out",)},
            input_srcs=(),
            platform="x86_64-linux",
            builder="/bin/sh",
            args=(),
            env={"name": "x"},
        )

    graph = {a: node(b), b: node(a)}
    with pytest.raises(ParseError) as info:
        hash_derivation_modulo(graph[a], graph.__getitem__)
    assert "cycle" in info.value.message
    assert "-a.drv -> " in info.value.message and "-b.drv" in info.value.message


def test_missing_input_output_is_an_error(drvs: dict[str, Derivation]) -> None:
    drv = dataclasses.replace(drvs[TOP], input_drvs={FOD_REC: ("dev",)})
    with pytest.raises(ParseError) as info:
        hash_derivation_modulo(drv, drvs.__getitem__)
    assert "no output 'dev'" in info.value.message


def test_fixed_output_with_a_wrong_path_is_rejected(drvs: dict[str, Derivation]) -> None:
    fod = drvs[FOD_REC]
    wrong = DerivationOutput(f"{P}-fod-rec", "r:sha256", fod.outputs["out"].hash)
    with pytest.raises(ParseError) as info:
        hash_derivation_modulo(dataclasses.replace(fod, outputs={"out": wrong}))
    assert "its hash gives" in info.value.message


def test_key_formats() -> None:
    digest = bytes(range(32))
    assert realisation_id(digest, "out") == f"sha256:{digest.hex()}!out"
    assert build_trace_id(basename(IA1), "dev") == "iazhwq15nz209yz46w2fwqymslwj1l1f-ia1.drv^dev"


# --------------------------------------------------------------------- store reader


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    for path, text in NIX_DRVS.items():
        (tmp_path / path.lstrip("/")).write_bytes(encode_drv(text))
    return tmp_path


def test_store_reader_reads_a_chroot_store(store_root: Path) -> None:
    reader = StoreReader(str(store_root))
    assert reader.real_path(TOP) == str(store_root) + TOP
    assert reader.exists(TOP)
    assert not reader.exists(f"{P}-missing.drv")
    drv = reader.read_derivation(TOP)
    assert reader.read_derivation(TOP) is drv
    closure = reader.load_closure(TOP)
    assert TOP in closure and IA1 in closure and FOD_REC in closure
    assert SA not in closure
    assert len(closure) == 9
    ids = realisation_ids(drv, reader.read_derivation)
    assert set(ids.values()) <= set(NIX_REALISATIONS)


def test_store_reader_errors(store_root: Path) -> None:
    reader = StoreReader(str(store_root))
    with pytest.raises(EnvironmentFault):
        reader.read_derivation(f"{P}-missing.drv")
    with pytest.raises(ParseError):
        reader.read_derivation("/elsewhere/x.drv")
    with pytest.raises(ParseError):
        reader.read_derivation(f"{P}-not-a-drv")
    broken = f"{P}-broken.drv"
    (store_root / broken.lstrip("/")).write_bytes(b"Derive([")
    with pytest.raises(ParseError) as info:
        reader.read_derivation(broken)
    assert broken in info.value.what
    # valid ATerm under a path it does not hash to
    moved = f"{P}-top.drv"
    (store_root / moved.lstrip("/")).write_bytes(encode_drv(NIX_DRVS[TOP]))
    with pytest.raises(ParseError) as info:
        reader.read_derivation(moved)
    assert "hash to" in info.value.message
    assert StoreReader(str(store_root), verify_paths=False).read_derivation(moved).name == "top"
